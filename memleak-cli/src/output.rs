//! stdout, written by a thread of its own: a write blocks while nobody
//! reads a full pipe, and memleak must still end at Ctrl-C (it sat in
//! `write` until the pipe drained). Reports, status lines and `-t` events
//! are queued whole, in order; what does not fit in the queue while the
//! writer is stuck is dropped, with one warning. A failed write is kept and
//! returned as one error naming stdout.

use std::{
    collections::VecDeque,
    io::{self, Write as _},
    sync::{Condvar, Mutex, OnceLock},
    time::{Duration, Instant},
};

use crate::error::{Kind, user_error};

/// Bytes queued at most while the writer is stuck (a message is taken
/// whole if nothing is queued, however long).
const LIMIT: usize = 16 << 20;

/// How long memleak waits at exit for stdout to take what is queued.
pub const DRAIN: Duration = Duration::from_secs(1);

struct Queue {
    messages: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The writer is in a write.
    busy: bool,
    dropped: u64,
    error: Option<io::Error>,
}

struct Stdout {
    queue: Mutex<Queue>,
    /// Signalled when a message is queued, and when the queue is drained.
    changed: Condvar,
}

fn stdout() -> &'static Stdout {
    static STDOUT: OnceLock<Stdout> = OnceLock::new();
    STDOUT.get_or_init(|| {
        let queue = Queue { messages: VecDeque::new(), bytes: 0, busy: false, dropped: 0, error: None };
        let stdout = Stdout { queue: Mutex::new(queue), changed: Condvar::new() };
        std::thread::Builder::new()
            .name("stdout".into())
            .spawn(write_queued)
            .expect("starting the stdout writer");
        stdout
    })
}

/// The writer thread: writes messages as they come, until a write fails.
fn write_queued() {
    let stdout = stdout();
    let mut out = io::stdout().lock();
    loop {
        let message = {
            let mut queue = stdout.queue.lock().expect("stdout queue");
            queue.busy = false;
            stdout.changed.notify_all();
            loop {
                if let Some(message) = queue.messages.pop_front() {
                    queue.bytes -= message.len();
                    queue.busy = true;
                    break message;
                }
                queue = stdout.changed.wait(queue).expect("stdout queue");
            }
        };
        if let Err(e) = out.write_all(&message).and_then(|()| out.flush()) {
            let mut queue = stdout.queue.lock().expect("stdout queue");
            queue.error = Some(e);
            queue.busy = false;
            queue.messages.clear();
            queue.bytes = 0;
            stdout.changed.notify_all();
            return;
        }
    }
}

/// The error of a write that failed, as memleak reports it.
fn failed(e: &io::Error) -> anyhow::Error {
    user_error(Kind::Output, format!("writing stdout: {e}"))
}

/// Queues `message` for stdout. Dropped, with a warning the first time, if
/// stdout is not taking what was queued before; an error if a write failed.
pub fn write(message: Vec<u8>) -> anyhow::Result<()> {
    let stdout = stdout();
    let mut queue = stdout.queue.lock().expect("stdout queue");
    if let Some(e) = &queue.error {
        return Err(failed(e));
    }
    let idle = queue.messages.is_empty() && !queue.busy;
    if !idle && queue.bytes + message.len() > LIMIT {
        queue.dropped += 1;
        if queue.dropped == 1 {
            crate::warn!("stdout is not being read: output dropped until it is");
        }
        return Ok(());
    }
    queue.bytes += message.len();
    queue.messages.push_back(message);
    stdout.changed.notify_all();
    Ok(())
}

/// Queues a line for stdout (status lines, `-t` events); see `write`.
pub fn line(text: &str) -> anyhow::Result<()> {
    write(format!("{text}\n").into_bytes())
}

/// At exit: waits up to `limit` for stdout to take what is queued; a
/// failed write is an error, output not taken is one warning.
pub fn finish(limit: Duration) -> anyhow::Result<()> {
    let stdout = stdout();
    let deadline = Instant::now() + limit;
    let mut queue = stdout.queue.lock().expect("stdout queue");
    while queue.error.is_none() && (queue.busy || !queue.messages.is_empty()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            crate::warn!("stdout is not being read: {} bytes of output not written{}",
                queue.bytes,
                if queue.busy { ", and a write under way" } else { "" }
            );
            return Ok(());
        }
        queue = stdout.changed.wait_timeout(queue, left).expect("stdout queue").0;
    }
    if let Some(e) = &queue.error {
        return Err(failed(e));
    }
    if queue.dropped > 1 {
        crate::warn!("stdout was not read for a while: {} reports or lines dropped", queue.dropped);
    }
    Ok(())
}
