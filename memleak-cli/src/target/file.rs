//! The one way memleak opens a file of a traced process: once, from what
//! the process really maps, and from then on only through that descriptor.
//!
//! A path a process shows (in /proc/PID/maps) means something only in its
//! own mount namespace. Resolved on the host, even through /proc/PID/root,
//! it is not safe: an absolute symlink in a container is followed against
//! memleak's root, so a container that swaps its libc for a symlink to a
//! host program between two uses of the name gets memleak's breakpoints
//! written into that host program. /proc/PID/map_files/START-END instead
//! opens the mapping's own file (it needs root, which memleak has), and
//! its device and inode are checked against the maps line, since the range
//! may have been unmapped and reused between the two reads. The ELF
//! reader, the symbolizer and the uprobe attach then all take
//! `/proc/self/fd/N`, which the kernel resolves to that same open file.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::fs::{FileExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use super::proc::Mapping;

/// A file held open, named by its device and inode on the host.
#[derive(Debug)]
pub struct TargetFile {
    file: File,
    dev: u64,
    ino: u64,
}

impl TargetFile {
    /// The file behind `mapping` of process `pid`, as the process maps it.
    pub fn mapped(pid: u32, mapping: &Mapping) -> io::Result<Self> {
        let map_file = format!("/proc/{pid}/map_files/{:x}-{:x}", mapping.start, mapping.end);
        let opened = Self::from_file(File::open(map_file)?)?;
        if Some(opened.device()) != mapping.device() || opened.ino != mapping.inode {
            return Err(io::Error::other(format!(
                "{} changed while it was opened (the range now maps another file)",
                mapping.path
            )));
        }
        Ok(opened)
    }

    /// The file at `path` (relative) inside process `pid`'s root, the name
    /// resolved as the process would: symbolic links, absolute or `..`,
    /// stay inside that root (`openat2` with `RESOLVE_IN_ROOT`, Linux
    /// 5.6), so a container's name never leads to a host file. For files
    /// a traced file names by its build id (its separate debug info).
    pub fn in_root(pid: u32, path: &str) -> io::Result<Self> {
        let root = File::open(format!("/proc/{pid}/root"))?;
        let name = std::ffi::CString::new(path).map_err(io::Error::other)?;
        // SAFETY: plain integers, all zero is valid.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 with a directory fd we hold, a NUL-terminated
        // name and an open_how of the size passed.
        let fd = unsafe {
            libc::syscall(libc::SYS_openat2, root.as_raw_fd(), name.as_ptr(), &raw const how, size_of::<libc::open_how>())
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us this descriptor.
        Self::from_file(unsafe { File::from_raw_fd(fd as i32) })
    }

    /// The open file, for readers that take one.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// A file named on memleak's own command line (`-O PATH`), or one of
    /// memleak's own files: a host path by the user's choice, not a name
    /// from a traced process.
    pub fn host(path: &Path) -> io::Result<Self> {
        Self::from_file(File::open(path)?)
    }

    fn from_file(file: File) -> io::Result<Self> {
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        Ok(Self { dev: meta.dev(), ino: meta.ino(), file })
    }

    /// `/proc/self/fd/N`: a path that the kernel (uprobe attach) and the
    /// libraries that take paths (blazesym) resolve to this open file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// (device, inode): the file's identity on the host.
    pub fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// The device as /proc/PID/maps prints it (`fd:01`) and the inode,
    /// for messages.
    pub fn describe(&self) -> String {
        let (major, minor) = self.device();
        format!("inode {} on device {major:02x}:{minor:02x}", self.ino)
    }

    fn device(&self) -> (u32, u32) {
        (libc::major(self.dev), libc::minor(self.dev))
    }

    /// The file's size now.
    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// `buf.len()` bytes at `offset`, or an error.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// The whole file, read at offsets (the descriptor's position is
    /// never used, so readers never race).
    pub fn read(&self) -> io::Result<Vec<u8>> {
        let len = self.file.metadata()?.len() as usize;
        let mut data = vec![0; len];
        let mut at = 0;
        while at < len {
            match self.file.read_at(&mut data[at..], at as u64) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        data.truncate(at);
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::proc::Target;

    fn own_libc() -> Mapping {
        let maps = Target::open(std::process::id()).unwrap().maps().unwrap();
        maps.into_iter().find(|m| m.path.contains("/libc.so")).unwrap()
    }

    #[test]
    fn opens_what_the_process_maps_and_checks_it() {
        let libc = own_libc();
        let file = TargetFile::mapped(std::process::id(), &libc).unwrap();
        let meta = std::fs::metadata(&libc.path).unwrap();
        assert_eq!(file.id(), (meta.dev(), meta.ino()));
        // The descriptor's path leads to the same file.
        let through = std::fs::metadata(file.path()).unwrap();
        assert_eq!((through.dev(), through.ino()), file.id());
        assert_eq!(file.read().unwrap(), std::fs::read(&libc.path).unwrap());
        assert!(file.describe().starts_with(&format!("inode {} on device {}", libc.inode, libc.dev)));
        // The same range said to hold another inode, or another device:
        // refused, whatever the range holds.
        let mut other = libc.clone();
        other.inode += 1;
        assert!(TargetFile::mapped(std::process::id(), &other).is_err());
        let mut other = libc.clone();
        other.dev = "ff:ff".into();
        assert!(TargetFile::mapped(std::process::id(), &other).is_err());
    }

    #[test]
    fn only_regular_files() {
        assert!(TargetFile::host(Path::new("/dev/null")).is_err());
        assert!(TargetFile::host(Path::new("/proc")).is_err());
    }
}
