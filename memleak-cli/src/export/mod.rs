//! The files written at exit (`--folded`, `--flamegraph`, `--pprof`): the
//! last report's every stack, in the formats other tools read. The files
//! are created at start, so a bad path fails before tracing, not after.

pub mod flamegraph;
pub mod folded;
pub mod pprof;

use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::{
    error::{Kind, user_error},
    symbolize::{MappingInfo, StackProfile},
};

/// A file the user asked for, open for writing: a temporary file beside
/// it, renamed over it once written, so that a run that fails (or is
/// killed) leaves the file as it was. A path that is not a regular file
/// (a device, a FIFO) is written in place.
struct Output {
    option: &'static str,
    path: PathBuf,
    /// The temporary file, until renamed.
    temp: Option<PathBuf>,
    file: File,
}

impl Output {
    fn create(option: &'static str, path: &Path) -> anyhow::Result<Self> {
        let cannot = |e: &dyn std::fmt::Display| user_error(Kind::Usage, format!("cannot create {option} {}: {e}", path.display()));
        let special = match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => return Err(cannot(&"it is a directory")),
            Ok(meta) => !meta.is_file(),
            Err(_) => false,
        };
        if special {
            let file = File::options().write(true).open(path).map_err(|e| cannot(&e))?;
            return Ok(Self { option, path: path.to_path_buf(), temp: None, file });
        }
        let name = path.file_name().ok_or_else(|| cannot(&"no file name"))?;
        let temp = path.with_file_name(format!(".{}.memleak-{}", name.to_string_lossy(), std::process::id()));
        let file = File::options().write(true).create_new(true).open(&temp).map_err(|e| cannot(&e))?;
        Ok(Self { option, path: path.to_path_buf(), temp: Some(temp), file })
    }

    /// Writes the file whole, and puts it in place.
    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let context = || format!("writing {} {}", self.option, self.path.display());
        self.file.write_all(bytes).with_context(context)?;
        if let Some(temp) = &self.temp {
            std::fs::rename(temp, &self.path).with_context(context)?;
            self.temp = None;
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some(temp) = &self.temp {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// The paths of the files asked for.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    pub folded: Option<PathBuf>,
    pub flamegraph: Option<PathBuf>,
    pub pprof: Option<PathBuf>,
}

/// The files asked for.
pub struct Exports {
    folded: Option<Output>,
    flamegraph: Option<Output>,
    pprof: Option<Output>,
}

impl Exports {
    pub fn create(paths: &Paths) -> anyhow::Result<Self> {
        let asked = [("--folded", &paths.folded), ("--flamegraph", &paths.flamegraph), ("--pprof", &paths.pprof)];
        let asked: Vec<(&str, &Path)> = asked.iter().filter_map(|(o, p)| Some((*o, p.as_deref()?))).collect();
        for (i, (a, path_a)) in asked.iter().enumerate() {
            if let Some((b, _)) = asked[i + 1..].iter().find(|(_, path_b)| same_file(path_a, path_b)) {
                return Err(user_error(Kind::Usage, format!("{a} and {b} name the same file: {}", path_a.display())));
            }
        }
        let open = |option, path: &Option<PathBuf>| path.as_deref().map(|p| Output::create(option, p)).transpose();
        Ok(Self {
            folded: open("--folded", &paths.folded)?,
            flamegraph: open("--flamegraph", &paths.flamegraph)?,
            pprof: open("--pprof", &paths.pprof)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.folded.is_none() && self.flamegraph.is_none() && self.pprof.is_none()
    }

    /// Writes every file; `title` names the traced processes in the SVG,
    /// `comm` each process in the profile's labels.
    pub fn write(
        &mut self,
        stacks: &[StackProfile],
        title: &str,
        mapping: &mut dyn FnMut(u32, u64) -> Option<MappingInfo>,
        comm: &mut dyn FnMut(u32) -> Option<String>,
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
            let profile = pprof::build(stacks, pprof::Values::Inuse, mapping, comm, meta);
            out.write(&pprof::encode_gzip(&profile).context("compressing the pprof profile")?)?;
        }
        Ok(())
    }
}

/// Whether two paths name one file: the same name in the same directory
/// (however written), or one file already (links).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return (a.dev(), a.ino()) == (b.dev(), b.ino());
    }
    let place = |p: &Path| {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        (dir.canonicalize().ok(), p.file_name().map(|n| n.to_owned()))
    };
    let (place_a, place_b) = (place(a), place(b));
    place_a.0.is_some() && place_a == place_b
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{cli::Args, symbolize::Frame};

    /// The paths as the command line gives them.
    fn args(extra: &[&str]) -> Paths {
        Args::try_parse_from(["memleak", "-p", "1"].iter().chain(extra)).unwrap().settings().unwrap().exports
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
            end: None,
        };
        let stacks = [StackProfile { tgid: 1, bytes: 16384, count: 2, frames: vec![frame(1, "leaf"), frame(2, "root")], ..Default::default() }];
        let meta = pprof::Meta { time_nanos: 0, duration_nanos: 1, period: 1 };
        exports.write(&stacks, "pid 1", &mut |_, _| None, &mut |_| None, meta).unwrap();
        assert_eq!(std::fs::read_to_string(&folded).unwrap(), "root;leaf 16384\n");
        assert!(std::fs::read_to_string(&svg).unwrap().contains("leaf"));
        assert_eq!(&std::fs::read(&pprof).unwrap()[..2], &[0x1f, 0x8b]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(Exports::create(&args(&[])).unwrap().is_empty());
    }

    #[test]
    fn a_file_is_replaced_only_once_written_and_kept_if_never() {
        let dir = std::env::temp_dir().join(format!("memleak-exports-keep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("heap.folded");
        std::fs::write(&path, "old 1\n").unwrap();
        let exports = Exports::create(&args(&["--folded", path.to_str().unwrap()])).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old 1\n", "not truncated at start");
        drop(exports);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old 1\n");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("heap.folded")], "no temporary file left");
        let mut exports = Exports::create(&args(&["--folded", path.to_str().unwrap()])).unwrap();
        let meta = pprof::Meta { time_nanos: 0, duration_nanos: 1, period: 1 };
        exports.write(&[], "pid 1", &mut |_, _| None, &mut |_| None, meta).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_file_for_two_exports_is_a_usage_error() {
        let dir = std::env::temp_dir();
        let a = dir.join(format!("memleak-same-{}.out", std::process::id()));
        let b = dir.join(".").join(a.file_name().unwrap());
        let err = Exports::create(&args(&["--folded", a.to_str().unwrap(), "--pprof", b.to_str().unwrap()])).err().unwrap();
        assert_eq!(crate::error::exit_code(&err), Kind::Usage as u8);
        assert_eq!(err.to_string(), format!("--folded and --pprof name the same file: {}", a.display()));
        assert!(!a.exists());
    }

    #[test]
    fn a_path_that_cannot_be_created_is_a_usage_error() {
        let err = Exports::create(&args(&["--pprof", "/nonexistent-dir/x.pb.gz"])).err().unwrap();
        assert_eq!(crate::error::exit_code(&err), Kind::Usage as u8);
        assert_eq!(err.to_string(), "cannot create --pprof /nonexistent-dir/x.pb.gz: No such file or directory (os error 2)");
    }
}
