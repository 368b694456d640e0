//! `--dump DIR`: each report's leaked blocks, whole, in files that `grep
//! -a -c` and `strings | sort | uniq -c` answer the seeds' question on
//! (shared/seeds/004: which requests leaked), with an index that says
//! which bytes are which block of which stack.
//!
//! DIR holds the dump of the latest report that wrote a block:
//! `R-K.bin`, the blocks of the K-th stack of report R (oldest first,
//! back to back), and `index.json`. Each report writes up to the byte
//! budget, then removes the files of the report before. Every file is
//! made with `openat` in DIR's descriptor, `O_NOFOLLOW | O_EXCL`, mode
//! 0600: a link planted in DIR is never followed.

use std::{
    ffi::CString,
    fs::{self, File},
    io::{self, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    aggregate::Block,
    json::FrameJson,
    peek::{Memory, read_live},
};
use crate::{
    error::{Kind, user_error},
};

/// One reported stack's blocks to write.
pub struct Stack {
    pub tgid: u32,
    pub comm: Option<String>,
    /// The hooked function that made its blocks.
    pub kind: memleak_common::Kind,
    /// Its outstanding bytes and blocks, as the report counts them.
    pub bytes: u64,
    pub count: u64,
    pub frames: Vec<FrameJson>,
    /// Oldest first: the first to go in when the budget is short.
    pub blocks: Vec<Block>,
}

/// What one report's dump wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub blocks_written: u64,
    pub bytes_written: u64,
    /// Blocks left out: the budget was spent.
    pub blocks_over_budget: u64,
    /// Blocks left out: freed (or unmapped) after the report read the
    /// kernel's maps, or their process gone.
    pub blocks_gone: u64,
}

#[derive(Serialize)]
struct Index<'a> {
    report: u64,
    dir: String,
    budget_bytes: u64,
    #[serde(flatten)]
    counts: Counts,
    stacks: Vec<IndexStack<'a>>,
}

#[derive(Serialize)]
struct IndexStack<'a> {
    /// `R-K.bin`, null if none of its blocks was written.
    file: Option<String>,
    rank: usize,
    pid: u32,
    comm: Option<&'a str>,
    kind: &'static str,
    bytes: u64,
    count: u64,
    frames: &'a [FrameJson],
    #[serde(flatten)]
    counts: Counts,
    /// The blocks written, in the file's order.
    blocks: Vec<IndexBlock>,
}

#[derive(Serialize)]
struct IndexBlock {
    addr: String,
    size: u64,
    /// Where its bytes start in the file.
    offset: u64,
}

/// `--dump DIR`, `--dump-budget`, `--force`.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub budget: u64,
    pub force: bool,
}

/// `--dump`, opened as [`Dump::create`] says, if asked for.
pub fn create(options: Option<&Options>) -> anyhow::Result<Option<Dump>> {
    options.map(|o| Dump::create(&o.dir, o.budget, o.force)).transpose()
}

pub struct Dump {
    dir: OwnedFd,
    path: PathBuf,
    budget: u64,
    /// The files of the dump in DIR now.
    files: Vec<String>,
}

impl Dump {
    /// Opens DIR for the dumps, creating it (mode 0700) if it does not
    /// exist. Refused (usage errors, before anything is traced): a path
    /// that is a symbolic link or not a directory, a directory that holds
    /// anything unless `force`, a read-only file system, or one with less
    /// room than the budget.
    pub fn create(path: &Path, budget: u64, force: bool) -> anyhow::Result<Self> {
        let shown = path.display();
        let refuse = |why: String| user_error(Kind::Usage, format!("--dump {shown}: {why}"));
        let mut made = false;
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(refuse("is a symbolic link, not a directory".into())),
            Ok(meta) if !meta.is_dir() => return Err(refuse("exists and is not a directory".into())),
            Ok(_) => {
                let mut entries = fs::read_dir(path).map_err(|e| refuse(e.to_string()))?;
                if !force && entries.next().is_some() {
                    return Err(refuse("the directory is not empty (--force writes into it)".into()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new().mode(0o700).create(path).map_err(|e| refuse(format!("cannot create it: {e}")))?;
                made = true;
            }
            Err(e) => return Err(refuse(e.to_string())),
        }
        Self::open(path, budget).inspect_err(|_| {
            if made {
                let _ = fs::remove_dir(path);
            }
        })
    }

    /// Opens the directory `create` found or made, if it may be written.
    fn open(path: &Path, budget: u64) -> anyhow::Result<Self> {
        let shown = path.display();
        let refuse = |why: String| user_error(Kind::Usage, format!("--dump {shown}: {why}"));
        let dir = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| refuse(e.to_string()))?;
        let dir = OwnedFd::from(dir);
        // SAFETY: an open descriptor and a zeroed statvfs to fill.
        let mut fs_stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatvfs(dir.as_raw_fd(), &mut fs_stat) } != 0 {
            return Err(refuse(io::Error::last_os_error().to_string()));
        }
        if fs_stat.f_flag & libc::ST_RDONLY != 0 {
            return Err(refuse("read-only file system".into()));
        }
        let free = u64::from(fs_stat.f_bavail).saturating_mul(u64::from(fs_stat.f_frsize));
        if free < budget {
            return Err(refuse(format!("{free} bytes free on its file system, less than --dump-budget {budget}")));
        }
        Ok(Self { dir, path: path.to_path_buf(), budget, files: Vec::new() })
    }

    /// Writes report `report`'s stacks (in its order), reading each block
    /// through `memory` (a block is written only if it was outstanding
    /// until its read ended), up to the budget, then the index; removes
    /// the previous report's files. A report that writes no block leaves
    /// the previous dump as it was. Fails only if a file cannot be
    /// written (a full disk): the dump then stops.
    pub fn write(&mut self, report: u64, stacks: &[Stack], memory: &dyn Memory) -> io::Result<Counts> {
        let mut left = self.budget;
        let mut total = Counts::default();
        let mut index = Vec::with_capacity(stacks.len());
        let mut files = Vec::new();
        for (i, stack) in stacks.iter().enumerate() {
            let rank = i + 1;
            let mut counts = Counts::default();
            let mut blocks = Vec::new();
            let mut file: Option<(String, File)> = None;
            for block in &stack.blocks {
                if block.size > left {
                    counts.blocks_over_budget += 1;
                    continue;
                }
                let Some(bytes) = read_live(memory, stack.tgid, block, block.size as usize) else {
                    counts.blocks_gone += 1;
                    continue;
                };
                if file.is_none() {
                    let name = format!("{report}-{rank}.bin");
                    let created = self.create_file(&name);
                    files.push(name.clone());
                    file = Some((name, created.inspect_err(|_| self.remove(&files))?));
                }
                let (_, f) = file.as_mut().expect("created above");
                f.write_all(&bytes).inspect_err(|_| self.remove(&files))?;
                blocks.push(IndexBlock { addr: format!("{:#x}", block.addr), size: block.size, offset: counts.bytes_written });
                counts.blocks_written += 1;
                counts.bytes_written += block.size;
                left -= block.size;
            }
            total.blocks_written += counts.blocks_written;
            total.bytes_written += counts.bytes_written;
            total.blocks_over_budget += counts.blocks_over_budget;
            total.blocks_gone += counts.blocks_gone;
            index.push(IndexStack {
                file: file.map(|(name, _)| name),
                rank,
                pid: stack.tgid,
                comm: stack.comm.as_deref(),
                kind: stack.kind.name(),
                bytes: stack.bytes,
                count: stack.count,
                frames: &stack.frames,
                counts,
                blocks,
            });
        }
        if total.blocks_written == 0 {
            return Ok(total);
        }
        let index = Index {
            report,
            dir: self.path.display().to_string(),
            budget_bytes: self.budget,
            counts: total,
            stacks: index,
        };
        let mut text = serde_json::to_vec_pretty(&index).map_err(io::Error::other)?;
        text.push(b'\n');
        // Whole or not at all: written beside it, renamed over it.
        let temp = ".index.json.tmp";
        let written = self.create_file(temp).and_then(|mut f| f.write_all(&text));
        if let Err(e) = written.and_then(|()| self.rename(temp, "index.json")) {
            self.remove(&files);
            self.remove(&[temp.to_string()]);
            return Err(e);
        }
        let previous = std::mem::replace(&mut self.files, files);
        self.remove(&previous);
        Ok(total)
    }

    /// Where the dumps go, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new file NAME in DIR, mode 0600: whatever had that name (a file
    /// of an earlier run, a symbolic link) is removed first, not followed.
    fn create_file(&self, name: &str) -> io::Result<File> {
        self.remove(&[name.to_string()]);
        let c = CString::new(name).map_err(io::Error::other)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: a valid directory descriptor and NUL-terminated name.
        let fd = unsafe { libc::openat(self.dir.as_raw_fd(), c.as_ptr(), flags, 0o600 as libc::c_uint) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just opened, owned by nothing else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (CString::new(from).map_err(io::Error::other)?, CString::new(to).map_err(io::Error::other)?);
        let dir = self.dir.as_raw_fd();
        // SAFETY: valid descriptors and NUL-terminated names.
        if unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes these names from DIR (a link itself, never what it names).
    fn remove(&self, names: &[String]) {
        for name in names {
            if let Ok(c) = CString::new(name.as_str()) {
                // SAFETY: a valid directory descriptor and NUL-terminated name.
                unsafe { libc::unlinkat(self.dir.as_raw_fd(), c.as_ptr(), 0) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, os::unix::fs::PermissionsExt as _};

    use super::*;

    /// A process's blocks; those in `gone` are freed by the time they are read.
    struct Fake {
        bytes: HashMap<u64, Vec<u8>>,
        gone: Vec<u64>,
    }

    impl Memory for Fake {
        fn read(&self, _: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
            self.bytes.get(&addr).map(|b| b[..len].to_vec())
        }
        fn live(&self, _: u32, block: &Block) -> bool {
            !self.gone.contains(&block.addr)
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("memleak-dump-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn stack(blocks: &[(u64, u64)]) -> Stack {
        Stack {
            tgid: 7,
            comm: Some("app".into()),
            kind: memleak_common::Kind::Calloc,
            bytes: blocks.iter().map(|b| b.1).sum(),
            count: blocks.len() as u64,
            frames: vec![],
            blocks: blocks.iter().map(|&(addr, size)| Block { addr, size, born_ns: 0 }).collect(),
        }
    }

    fn usage_error(result: anyhow::Result<Dump>, says: &str) {
        let err = result.err().expect("refused");
        assert_eq!(crate::error::exit_code(&err), Kind::Usage as u8);
        assert!(err.to_string().contains(says), "{err}");
    }

    #[test]
    fn refuses_links_files_full_directories_and_too_little_room() {
        let dir = scratch("refuse");
        fs::create_dir(&dir).unwrap();
        let file = dir.join("file");
        fs::write(&file, "x").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(std::env::temp_dir(), &link).unwrap();
        usage_error(Dump::create(&link, 1, false), "is a symbolic link");
        usage_error(Dump::create(&file, 1, false), "exists and is not a directory");
        usage_error(Dump::create(&dir, 1, false), "not empty (--force writes into it)");
        usage_error(Dump::create(&dir.join("no/such"), 1, false), "cannot create it");
        usage_error(Dump::create(&dir, u64::MAX, true), "less than --dump-budget");
        Dump::create(&dir, 1, true).unwrap();
        // Made 0700.
        let new = dir.join("new");
        Dump::create(&new, 1, false).unwrap();
        assert_eq!(fs::metadata(&new).unwrap().permissions().mode() & 0o777, 0o700);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_blocks_oldest_first_within_budget_with_an_index() {
        let dir = scratch("write");
        let mut dump = Dump::create(&dir, 7, false).unwrap();
        let fake = Fake {
            bytes: HashMap::from([(0x10, b"abcd".to_vec()), (0x20, b"efg".to_vec()), (0x30, b"hijk".to_vec()),
                                  (0x40, b"zz".to_vec()), (0x50, b"XY".to_vec())]),
            gone: vec![0x20],
        };
        // Of 7 bytes: 0x20 is freed meanwhile; 0x30 does not fit in the 3
        // left, 0x40 does, and then 0x50 does not.
        let counts = dump.write(3, &[stack(&[(0x10, 4), (0x20, 3), (0x30, 4)]), stack(&[(0x40, 2)]), stack(&[(0x50, 2)])], &fake).unwrap();
        assert_eq!(counts, Counts { blocks_written: 2, bytes_written: 6, blocks_over_budget: 2, blocks_gone: 1 });
        assert_eq!(fs::read(dir.join("3-1.bin")).unwrap(), b"abcd");
        assert_eq!(fs::read(dir.join("3-2.bin")).unwrap(), b"zz");
        assert!(!dir.join("3-3.bin").exists());
        let index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        assert_eq!((index["report"].as_u64(), index["blocks_written"].as_u64(), index["budget_bytes"].as_u64()), (Some(3), Some(2), Some(7)));
        assert_eq!((index["stacks"][2]["file"].clone(), index["stacks"][2]["blocks_over_budget"].as_u64()), (serde_json::Value::Null, Some(1)));
        let first = &index["stacks"][0];
        assert_eq!(first["file"], "3-1.bin");
        assert_eq!(first["kind"], "calloc");
        assert_eq!(first["blocks"], serde_json::json!([{"addr": "0x10", "size": 4, "offset": 0}]));
        assert_eq!((first["blocks_gone"].as_u64(), first["blocks_over_budget"].as_u64()), (Some(1), Some(1)));
        assert_eq!(fs::metadata(dir.join("3-1.bin")).unwrap().permissions().mode() & 0o777, 0o600);

        // The next report replaces it; a link planted under its name is
        // removed, not followed.
        let outside = scratch("outside");
        fs::write(&outside, "mine").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("4-1.bin")).unwrap();
        dump.write(4, &[stack(&[(0x40, 2)])], &fake).unwrap();
        let mut names: Vec<String> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["4-1.bin", "index.json"]);
        assert_eq!(fs::read(dir.join("4-1.bin")).unwrap(), b"zz");
        assert_eq!(fs::read(&outside).unwrap(), b"mine");
        // A report that can read nothing (its process gone) leaves it.
        let gone = Fake { bytes: HashMap::new(), gone: vec![] };
        assert_eq!(dump.write(5, &[stack(&[(0x40, 2)])], &gone).unwrap().blocks_gone, 1);
        assert_eq!(fs::read(dir.join("4-1.bin")).unwrap(), b"zz");
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_file(&outside).unwrap();
    }
}
