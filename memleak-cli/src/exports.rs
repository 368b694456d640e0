//! The files written at exit (`--folded`, `--flamegraph`, `--pprof`): the
//! last report's every stack, in the formats other tools read. The files
//! are created at start, so a bad path fails before tracing, not after.

use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::{
    cli::Args,
    error::{Kind, user_error},
    flamegraph, folded,
    pprof::{self, MappingInfo},
    symbolize::Frame,
};

/// One stack's outstanding memory, symbolized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackProfile {
    pub tgid: u32,
    pub bytes: u64,
    pub count: u64,
    /// Innermost first; empty when the kernel could not record the stack.
    pub frames: Vec<Frame>,
}

/// A file the user asked for, open for writing.
struct Output {
    option: &'static str,
    path: PathBuf,
    file: File,
}

impl Output {
    fn create(option: &'static str, path: &Path) -> anyhow::Result<Self> {
        let file = File::create(path)
            .map_err(|e| user_error(Kind::Usage, format!("cannot create {option} {}: {e}", path.display())))?;
        Ok(Self { option, path: path.to_path_buf(), file })
    }

    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.file
            .write_all(bytes)
            .with_context(|| format!("writing {} {}", self.option, self.path.display()))
    }
}

/// The files asked for.
pub struct Exports {
    folded: Option<Output>,
    flamegraph: Option<Output>,
    pprof: Option<Output>,
}

impl Exports {
    pub fn create(args: &Args) -> anyhow::Result<Self> {
        let open = |option, path: &Option<PathBuf>| path.as_deref().map(|p| Output::create(option, p)).transpose();
        Ok(Self {
            folded: open("--folded", &args.folded)?,
            flamegraph: open("--flamegraph", &args.flamegraph)?,
            pprof: open("--pprof", &args.pprof)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.folded.is_none() && self.flamegraph.is_none() && self.pprof.is_none()
    }

    /// Writes every file; `title` names the traced processes in the SVG.
    pub fn write(
        &mut self,
        stacks: &[StackProfile],
        title: &str,
        mapping: &mut dyn FnMut(u32, u64) -> Option<MappingInfo>,
        meta: pprof::Meta,
    ) -> anyhow::Result<()> {
        let lines = folded::lines(stacks);
        if let Some(out) = &mut self.folded {
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            out.write(text.as_bytes())?;
        }
        if let Some(out) = &mut self.flamegraph {
            out.write(&flamegraph::svg(&lines, title)?)?;
        }
        if let Some(out) = &mut self.pprof {
            let profile = pprof::build(stacks, mapping, meta);
            out.write(&pprof::encode_gzip(&profile).context("compressing the pprof profile")?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(["memleak", "-p", "1"].iter().chain(extra)).unwrap()
    }

    #[test]
    fn writes_each_file_asked_for() {
        let dir = std::env::temp_dir().join(format!("memleak-exports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (folded, svg, pprof) = (dir.join("out.folded"), dir.join("out.svg"), dir.join("out.pb.gz"));
        let mut exports = Exports::create(&args(&[
            "--folded", folded.to_str().unwrap(),
            "--flamegraph", svg.to_str().unwrap(),
            "--pprof", pprof.to_str().unwrap(),
        ]))
        .unwrap();
        let frame = |addr, name: &str| Frame {
            addr,
            symbol: Some((name.into(), 1)),
            module: Some("app".into()),
            source: None,
            inlined: vec![],
        };
        let stacks = [StackProfile { tgid: 1, bytes: 16384, count: 2, frames: vec![frame(1, "leaf"), frame(2, "root")] }];
        let meta = pprof::Meta { time_nanos: 0, duration_nanos: 1, period: 1 };
        exports.write(&stacks, "pid 1", &mut |_, _| None, meta).unwrap();
        assert_eq!(std::fs::read_to_string(&folded).unwrap(), "root;leaf 16384\n");
        assert!(std::fs::read_to_string(&svg).unwrap().contains("leaf"));
        assert_eq!(&std::fs::read(&pprof).unwrap()[..2], &[0x1f, 0x8b]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(Exports::create(&args(&[])).unwrap().is_empty());
    }

    #[test]
    fn a_path_that_cannot_be_created_is_a_usage_error() {
        let err = Exports::create(&args(&["--pprof", "/nonexistent-dir/x.pb.gz"])).err().unwrap();
        assert_eq!(crate::error::exit_code(&err), Kind::Usage as u8);
        assert_eq!(err.to_string(), "cannot create --pprof /nonexistent-dir/x.pb.gz: No such file or directory (os error 2)");
    }
}
