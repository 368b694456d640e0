//! Debug files from debuginfod servers (`DEBUGINFOD_URLS`), for stripped
//! binaries whose debug file is not installed: `GET URL/buildid/ID/debuginfo`,
//! as elfutils' client asks, into the same cache it uses
//! (`$DEBUGINFOD_CACHE_PATH`, else `$XDG_CACHE_HOME/debuginfod_client`,
//! else `~/.cache/debuginfod_client`, each file at `ID/debuginfo`).
//!
//! Fetches run on a thread of their own, one at a time: a report never
//! waits for the network. A frame of a binary whose debug file is on its
//! way shows as an offset until a later report. A file is kept only if its
//! build id is the one asked for. A server that cannot be reached is said
//! once, and not asked again.
//!
//! Plain `http://` only (no TLS client here): point `DEBUGINFOD_URLS` at a
//! local server or proxy. The build id, the only part of the request a
//! traced program chooses, is hex by construction.

use std::{
    collections::HashSet,
    fs,
    io::{self, BufReader, Read, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    path::{Path, PathBuf},
    sync::mpsc::{self, Receiver, Sender},
    time::Duration,
};

use object::Object as _;

/// What the environment asks: servers, cache, timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Servers {
    pub urls: Vec<String>,
    pub cache: PathBuf,
    /// Per server and file: to connect, and between reads.
    pub timeout: Duration,
}

impl Servers {
    /// From `DEBUGINFOD_URLS` (servers apart by spaces), `DEBUGINFOD_CACHE_PATH`
    /// and `DEBUGINFOD_TIMEOUT` (seconds, default 10); None without servers.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let urls: Vec<String> =
            get("DEBUGINFOD_URLS")?.split_whitespace().map(|u| u.trim_end_matches('/').to_string()).collect();
        if urls.is_empty() {
            return None;
        }
        let cache = get("DEBUGINFOD_CACHE_PATH").map(PathBuf::from).unwrap_or_else(|| {
            let base = get("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(get("HOME").unwrap_or_else(|| "/root".into())).join(".cache"));
            base.join("debuginfod_client")
        });
        let timeout = get("DEBUGINFOD_TIMEOUT").and_then(|s| s.trim().parse().ok()).filter(|&s| s > 0).unwrap_or(10);
        Some(Self { urls, cache, timeout: Duration::from_secs(timeout) })
    }
}

/// Build ids asked for, and the files fetched since the last look.
pub struct Debuginfod {
    cache: PathBuf,
    asked: HashSet<Vec<u8>>,
    ask: Sender<Vec<u8>>,
    fetched: Receiver<Vec<u8>>,
}

impl Debuginfod {
    pub fn start(servers: Servers) -> Self {
        let (ask, asks) = mpsc::channel::<Vec<u8>>();
        let (done, fetched) = mpsc::channel();
        let cache = servers.cache.clone();
        std::thread::spawn(move || fetcher(&servers, &asks, &done));
        Self { cache, asked: HashSet::new(), ask, fetched }
    }

    /// The debug file of build `id`, if it is in the cache already; else
    /// it is asked for (once), and None.
    pub fn get(&mut self, id: &[u8]) -> Option<PathBuf> {
        let path = cached(&self.cache, id);
        if path.is_file() {
            return Some(path);
        }
        if self.asked.insert(id.to_vec()) {
            let _ = self.ask.send(id.to_vec());
        }
        None
    }

    /// Whether a file came since the last call.
    pub fn arrived(&self) -> bool {
        let mut any = false;
        while self.fetched.try_recv().is_ok() {
            any = true;
        }
        any
    }
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn cached(cache: &Path, id: &[u8]) -> PathBuf {
    cache.join(hex(id)).join("debuginfo")
}

/// Fetches each build id asked for from the first server that has it.
fn fetcher(servers: &Servers, asks: &Receiver<Vec<u8>>, done: &Sender<Vec<u8>>) {
    let mut down: HashSet<String> = HashSet::new();
    for id in asks {
        for url in &servers.urls {
            if down.contains(url) {
                continue;
            }
            match fetch(servers, url, &id) {
                Ok(true) => {
                    let _ = done.send(id.clone());
                    break;
                }
                Ok(false) => {}
                Err(Fetch::Unreachable(e)) => {
                    crate::warn!("debuginfod server {url} cannot be reached ({e}): not asked again");
                    down.insert(url.clone());
                }
                Err(Fetch::Bad(e)) => crate::warn!("debuginfod server {url}, build id {}: {e}", hex(&id)),
            }
        }
    }
}

enum Fetch {
    /// No connection: the server is not asked again.
    Unreachable(String),
    /// This file failed.
    Bad(String),
}

/// Fetches build `id` from `url` into the cache: Ok(false) if the server
/// does not have it.
fn fetch(servers: &Servers, url: &str, id: &[u8]) -> Result<bool, Fetch> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(Fetch::Unreachable("only http:// is supported: use a local server or proxy".into()));
    };
    let (authority, base) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let host_port = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    let addr = host_port
        .to_socket_addrs()
        .map_err(|e| Fetch::Unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| Fetch::Unreachable("no address".into()))?;
    let stream = TcpStream::connect_timeout(&addr, servers.timeout).map_err(|e| Fetch::Unreachable(e.to_string()))?;
    let bad = |e: io::Error| Fetch::Bad(e.to_string());
    stream.set_read_timeout(Some(servers.timeout)).map_err(bad)?;
    stream.set_write_timeout(Some(servers.timeout)).map_err(bad)?;
    let path = format!("/{}{}buildid/{}/debuginfo", base, if base.is_empty() || base.ends_with('/') { "" } else { "/" }, hex(id));
    write!(&stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: memleak\r\nConnection: close\r\n\r\n").map_err(bad)?;
    let mut reader = BufReader::new(stream);
    // A server that takes the connection and never answers is as good as
    // down: told once, not waited for again at every build id.
    let silent = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            Fetch::Unreachable(format!("no answer within {} s", servers.timeout.as_secs()))
        }
        _ => Fetch::Bad(e.to_string()),
    };
    let (status, chunked, length) = head(&mut reader).map_err(silent)?;
    if status == 404 {
        return Ok(false);
    }
    if status != 200 {
        return Err(Fetch::Bad(format!("HTTP status {status}")));
    }
    let dir = servers.cache.join(hex(id));
    fs::create_dir_all(&dir).map_err(bad)?;
    let temp = dir.join(format!(".debuginfo.{}", std::process::id()));
    let written = (|| {
        let mut file = fs::File::create(&temp)?;
        match (chunked, length) {
            (true, _) => copy_chunked(&mut reader, &mut file)?,
            (false, Some(n)) => {
                let got = io::copy(&mut (&mut reader).take(n), &mut file)?;
                if got != n {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{got} of {n} bytes")));
                }
            }
            (false, None) => {
                io::copy(&mut reader, &mut file)?;
            }
        }
        file.sync_all()
    })();
    let checked = written.map_err(bad).and_then(|()| match build_id(&temp) {
        Some(got) if got == id => Ok(()),
        _ => Err(Fetch::Bad("the file served is not that build's (build id differs)".into())),
    });
    match checked.and_then(|()| fs::rename(&temp, cached(&servers.cache, id)).map_err(bad)) {
        Ok(()) => Ok(true),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// The status line and headers: (status, chunked, Content-Length).
fn head(reader: &mut impl io::BufRead) -> io::Result<(u16, bool, Option<u64>)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("not an HTTP response: {:?}", line.trim_end())))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    Ok((status, chunked, length))
}

fn copy_chunked(reader: &mut impl io::BufRead, out: &mut impl io::Write) -> io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            return Ok(());
        }
        let got = io::copy(&mut reader.take(size), out)?;
        if got != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short chunk"));
        }
        line.clear();
        reader.read_line(&mut line)?;
    }
}

fn build_id(path: &Path) -> Option<Vec<u8>> {
    let file = fs::File::open(path).ok()?;
    let cache = object::read::ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    elf.build_id().ok().flatten().map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_and_cache_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(Servers::from_env(env(&[("HOME", "/h")])), None);
        assert_eq!(Servers::from_env(env(&[("DEBUGINFOD_URLS", "  ")])), None);
        let s = Servers::from_env(env(&[("DEBUGINFOD_URLS", "http://a:8002/ http://b"), ("HOME", "/h")])).unwrap();
        assert_eq!(s.urls, ["http://a:8002", "http://b"]);
        assert_eq!(s.cache, PathBuf::from("/h/.cache/debuginfod_client"));
        assert_eq!(s.timeout, Duration::from_secs(10));
        let s = Servers::from_env(env(&[
            ("DEBUGINFOD_URLS", "http://a"),
            ("XDG_CACHE_HOME", "/x"),
            ("DEBUGINFOD_TIMEOUT", "3"),
        ]))
        .unwrap();
        assert_eq!((s.cache, s.timeout), (PathBuf::from("/x/debuginfod_client"), Duration::from_secs(3)));
        let s = Servers::from_env(env(&[("DEBUGINFOD_URLS", "http://a"), ("DEBUGINFOD_CACHE_PATH", "/c")])).unwrap();
        assert_eq!(s.cache, PathBuf::from("/c"));
    }

    #[test]
    fn a_server_that_never_answers_is_unreachable() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let servers = Servers { urls: vec![url.clone()], cache: std::env::temp_dir(), timeout: Duration::from_secs(1) };
        let got = fetch(&servers, &url, &[0xab; 20]);
        assert!(matches!(got, Err(Fetch::Unreachable(ref e)) if e == "no answer within 1 s"), "{}", match got {
            Err(Fetch::Unreachable(e) | Fetch::Bad(e)) => e,
            Ok(found) => format!("Ok({found})"),
        });
        drop(silent);
    }

    #[test]
    fn chunked_and_sized_bodies() {
        let mut r = io::Cursor::new(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n".to_vec());
        assert_eq!(head(&mut r).unwrap(), (200, true, None));
        let mut out = Vec::new();
        copy_chunked(&mut r, &mut out).unwrap();
        assert_eq!(out, b"abcde");
        let mut r = io::Cursor::new(b"HTTP/1.0 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found".to_vec());
        assert_eq!(head(&mut r).unwrap(), (404, false, Some(9)));
        assert!(head(&mut io::Cursor::new(b"SSH-2.0\r\n".to_vec())).is_err());
    }
}
