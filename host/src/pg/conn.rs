//! One established, authenticated TCP connection to a peer rank: framed send / tag-matched
//! receive with stash, reader hand-off, timeouts and poisoning.
//!
//! Read side: one thread at a time holds the *reader role* and reads the socket without holding
//! the state lock. A frame for its own tag is read straight into its buffers; a frame whose tag
//! another thread is waiting for is handed over (header kept as `pending`, the waiter becomes the
//! reader and reads the payload straight into *its* buffers); any other frame is stashed. A frame
//! whose header was read but which could not be taken (length mismatch, too large, stash full,
//! timeout before its first payload byte) stays `pending`: it is still first in line.
//!
//! A receive that times out part way through a frame leaves it [`Unfinished`]: the next reader
//! reads the rest before anything else (into the stash, or dropped), so a timeout never makes the
//! stream unparseable. Only an I/O error or a closed peer in the middle of a frame poisons it —
//! and a send that stops part way, because the peer cannot tell where its frame ends.
//!
//! Write side: a timed lock serializes whole messages.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::stash::Stash;
use super::wait_until;
use super::wire::{
    peek_exact, read_full, read_full_observed, write_full_observed, Fail, Header, FRAME_HEADER_LEN,
};
use super::{total_len, Dest, Observer, PgError};

/// A frame whose reading stopped part way at a timeout; whoever reads the socket next finishes it
/// first.
#[derive(Debug)]
enum Unfinished {
    /// A frame header, `filled` of its bytes read.
    Header {
        bytes: [u8; FRAME_HEADER_LEN],
        filled: usize,
    },
    /// A payload nobody will take (a forgotten prefix, or a receive that timed out in its own
    /// message): `left` bytes to read and drop.
    Drop { left: u64 },
    /// A frame for the stash, `filled` of `buf` read.
    Stash {
        tag: u64,
        buf: Vec<u8>,
        filled: usize,
    },
}

#[derive(Debug)]
struct RxState {
    stash: Stash,
    /// Header of the frame first in line whose payload is still unread.
    pending: Option<Header>,
    /// The frame first in line, partly read (never together with `pending`).
    unfinished: Option<Unfinished>,
    reader_active: bool,
    /// The pending frame is reserved for a thread waiting for this tag.
    handoff: Option<u64>,
    /// Threads waiting in `recv`, per tag.
    waiting: HashMap<u64, usize>,
}

/// How a receive's wait for the socket ended.
enum Turn {
    /// This thread reads the socket (starting with the frame first in line, if one was begun).
    Read(Option<Header>, Option<Unfinished>),
    /// The receive is over: served from the stash, or failed.
    Over(Result<Option<Vec<u8>>, PgError>),
}

#[derive(Debug)]
pub(crate) struct PeerConn {
    peer: u32,
    stream: TcpStream,
    chunk: usize,
    poisoned: AtomicBool,
    tx_busy: Mutex<bool>,
    tx_cv: Condvar,
    rx: Mutex<RxState>,
    rx_cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holder of the reader role; gives it back (with the pending header and any hand-off) on drop.
struct ReaderRole<'c> {
    conn: &'c PeerConn,
    pending: Option<Header>,
    unfinished: Option<Unfinished>,
    handoff: bool,
}

impl Drop for ReaderRole<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.conn.rx);
        st.reader_active = false;
        st.pending = self.pending.take();
        st.unfinished = self.unfinished.take();
        if self.handoff {
            // Only while somebody still waits for it: the waiter may have timed out since the
            // reader looked (the last waiter to leave clears a hand-off, but only one already set).
            let tag = st.pending.map(|h| h.tag);
            st.handoff = tag.filter(|t| st.waiting.get(t).is_some_and(|&n| n > 0));
        }
        self.conn.rx_cv.notify_all();
    }
}

/// What [`PeerConn::finish`] completed.
enum Finished {
    Header(Header),
    Dropped,
    Stashed(u64),
}

enum ReadOutcome {
    Done(Result<Option<Vec<u8>>, PgError>),
    /// The frame first in line belongs to a waiting thread; wait again.
    HandedOff,
}

impl PeerConn {
    pub(crate) fn new(peer: u32, stream: TcpStream, chunk: usize, stash_limit: usize) -> Self {
        PeerConn {
            peer,
            stream,
            chunk: chunk.max(FRAME_HEADER_LEN),
            poisoned: AtomicBool::new(false),
            tx_busy: Mutex::new(false),
            tx_cv: Condvar::new(),
            rx: Mutex::new(RxState {
                stash: Stash::new(stash_limit),
                pending: None,
                unfinished: None,
                reader_active: false,
                handoff: None,
                waiting: HashMap::new(),
            }),
            rx_cv: Condvar::new(),
        }
    }

    fn poison(&self, why: &str) {
        if !self.poisoned.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                peer = self.peer,
                why,
                "connection poisoned, shutting it down"
            );
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        drop(lock(&self.rx));
        self.rx_cv.notify_all();
        drop(lock(&self.tx_busy));
        self.tx_cv.notify_all();
    }

    fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    fn fail_to_err(&self, f: Fail, tag: u64, timeout: Duration) -> PgError {
        match f {
            Fail::Timeout => PgError::Timeout {
                peer: self.peer,
                tag,
                after: timeout,
            },
            Fail::Closed => PgError::PeerClosed { peer: self.peer },
            Fail::Io(e) => PgError::io(Some(self.peer), &e),
        }
    }

    pub(crate) fn send(&self, tag: u64, parts: &[&[u8]], timeout: Duration) -> Result<(), PgError> {
        self.send_observed(tag, parts, timeout, None)
    }

    /// [`PeerConn::send`]; `observe`, if given, sees the payload piece by piece right before it is
    /// written ([`super::ProcessGroup::send_observed`]).
    pub(crate) fn send_observed(
        &self,
        tag: u64,
        parts: &[&[u8]],
        timeout: Duration,
        observe: Option<&mut Observer<'_>>,
    ) -> Result<(), PgError> {
        let deadline = Instant::now() + timeout;
        let timeout_err = || PgError::Timeout {
            peer: self.peer,
            tag,
            after: timeout,
        };
        // Timed lock: one message at a time.
        {
            let mut busy = lock(&self.tx_busy);
            loop {
                if self.is_poisoned() {
                    return Err(PgError::Poisoned { peer: self.peer });
                }
                if !*busy {
                    *busy = true;
                    break;
                }
                let (g, expired) = wait_until(&self.tx_cv, busy, deadline);
                busy = g;
                if expired && *busy {
                    return Err(timeout_err());
                }
            }
        }
        let result = self.send_locked(tag, parts, deadline, timeout, observe);
        *lock(&self.tx_busy) = false;
        self.tx_cv.notify_one();
        result
    }

    fn send_locked(
        &self,
        tag: u64,
        parts: &[&[u8]],
        deadline: Instant,
        timeout: Duration,
        observe: Option<&mut Observer<'_>>,
    ) -> Result<(), PgError> {
        if self.is_poisoned() {
            return Err(PgError::Poisoned { peer: self.peer });
        }
        let header = Header {
            tag,
            len: total_len(parts),
        }
        .encode();
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        bufs.push(&header);
        bufs.extend_from_slice(parts);
        let mut done = 0u64;
        // The observer numbers the caller's parts: the frame header is not one of them.
        let mut observe_parts = observe.map(|o| {
            move |i: usize, piece: &[u8]| {
                if i > 0 {
                    o(i - 1, piece)
                }
            }
        });
        let observe = observe_parts.as_mut().map(|o| o as &mut Observer<'_>);
        match write_full_observed(
            &self.stream,
            &bufs,
            deadline,
            self.chunk,
            &mut done,
            observe,
        ) {
            Ok(()) => Ok(()),
            Err(f) => {
                if done > 0 {
                    self.poison("send failed in the middle of a frame");
                }
                Err(self.fail_to_err(f, tag, timeout))
            }
        }
    }

    pub(crate) fn recv(
        &self,
        tag: u64,
        dest: Dest<'_, '_>,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, PgError> {
        self.recv_observed(tag, dest, timeout, None)
    }

    /// [`PeerConn::recv`]; `observe`, if given, sees a `Dest::Parts` payload piece by piece as it
    /// lands ([`super::ProcessGroup::recv_into_observed`]).
    pub(crate) fn recv_observed(
        &self,
        tag: u64,
        mut dest: Dest<'_, '_>,
        timeout: Duration,
        mut observe: Option<&mut Observer<'_>>,
    ) -> Result<Option<Vec<u8>>, PgError> {
        let deadline = Instant::now() + timeout;
        loop {
            let role = {
                let mut st = lock(&self.rx);
                let mut registered = false;
                let mut expired = false;
                let r = loop {
                    if let Some(len) = st.stash.peek_len(tag) {
                        break Turn::Over(dest.check(self.peer, tag, len as u64).map(|()| {
                            let v = st.stash.take(tag).expect("peeked");
                            dest.deliver(v)
                        }));
                    }
                    if self.is_poisoned() {
                        break Turn::Over(Err(PgError::Poisoned { peer: self.peer }));
                    }
                    let free = !st.reader_active && st.handoff.is_none_or(|t| t == tag);
                    if free {
                        st.reader_active = true;
                        if st.handoff == Some(tag) {
                            st.handoff = None;
                        }
                        break Turn::Read(st.pending.take(), st.unfinished.take());
                    }
                    if expired {
                        break Turn::Over(Err(PgError::Timeout {
                            peer: self.peer,
                            tag,
                            after: timeout,
                        }));
                    }
                    if !registered {
                        *st.waiting.entry(tag).or_default() += 1;
                        registered = true;
                    }
                    let (g, e) = wait_until(&self.rx_cv, st, deadline);
                    st = g;
                    expired = e;
                };
                if registered {
                    let n = st.waiting.get_mut(&tag).expect("registered");
                    *n -= 1;
                    if *n == 0 {
                        st.waiting.remove(&tag);
                        // Nobody left to take a frame reserved for this tag.
                        if st.handoff == Some(tag) && matches!(r, Turn::Over(_)) {
                            st.handoff = None;
                            self.rx_cv.notify_all();
                        }
                    }
                }
                match r {
                    Turn::Read(pending, unfinished) => ReaderRole {
                        conn: self,
                        pending,
                        unfinished,
                        handoff: false,
                    },
                    Turn::Over(result) => {
                        // Served from the stash: the whole payload is in the parts already.
                        if let (Ok(_), Dest::Parts(parts), Some(observe)) =
                            (&result, &dest, observe.as_deref_mut())
                        {
                            for (i, p) in parts.iter().enumerate() {
                                if !p.is_empty() {
                                    observe(i, p);
                                }
                            }
                        }
                        return result;
                    }
                }
            };
            match self.read_as_reader(
                role,
                tag,
                &mut dest,
                deadline,
                timeout,
                observe.as_deref_mut(),
            ) {
                ReadOutcome::Done(r) => return r,
                ReadOutcome::HandedOff => continue,
            }
        }
    }

    /// Reads frame `hdr`'s payload into `parts`. On failure the frame stays first in line if none of
    /// it was read; part way, a timeout loses the message (its rest is dropped by the next reader:
    /// [`PgError::TimeoutMidMessage`]) and anything else poisons the connection.
    fn read_payload(
        &self,
        role: &mut ReaderRole<'_>,
        hdr: Header,
        parts: &mut [&mut [u8]],
        (deadline, timeout): (Instant, Duration),
        tag: u64,
        observe: Option<&mut Observer<'_>>,
    ) -> Result<(), PgError> {
        let mut done = 0;
        read_full_observed(
            &self.stream,
            parts,
            deadline,
            self.chunk,
            &mut done,
            observe,
        )
        .map_err(|f| {
            if done == 0 {
                role.pending = Some(hdr);
                return self.fail_to_err(f, tag, timeout);
            }
            let left = hdr.len - done;
            self.stop_mid_frame(role, &f, Unfinished::Drop { left }, "a frame payload");
            match f {
                Fail::Timeout => PgError::TimeoutMidMessage {
                    peer: self.peer,
                    tag,
                    after: timeout,
                    received: done,
                    len: hdr.len,
                },
                f => self.fail_to_err(f, tag, timeout),
            }
        })
    }

    /// A read stopped in the middle of a frame, which `unfinished` describes: after a timeout the
    /// next reader finishes it; after anything else the stream is lost and the connection poisoned.
    fn stop_mid_frame(
        &self,
        role: &mut ReaderRole<'_>,
        f: &Fail,
        unfinished: Unfinished,
        what: &str,
    ) {
        match f {
            Fail::Timeout => role.unfinished = Some(unfinished),
            Fail::Closed | Fail::Io(_) => {
                self.poison(&format!("receive failed in the middle of {what}"));
            }
        }
    }

    /// Reads the rest of the frame `frame`, giving up at `deadline` (then it is left for the next
    /// reader, see [`stop_mid_frame`](Self::stop_mid_frame)).
    fn finish(
        &self,
        role: &mut ReaderRole<'_>,
        frame: Unfinished,
        deadline: Instant,
    ) -> Result<Finished, Fail> {
        match frame {
            Unfinished::Header { mut bytes, filled } => {
                let mut done = 0;
                let r = read_full(
                    &self.stream,
                    &mut [&mut bytes[filled..]],
                    deadline,
                    FRAME_HEADER_LEN,
                    &mut done,
                );
                let filled = filled + done as usize;
                match r {
                    Ok(()) => Ok(Finished::Header(Header::decode(&bytes))),
                    Err(f) => {
                        if filled > 0 {
                            let header = Unfinished::Header { bytes, filled };
                            self.stop_mid_frame(role, &f, header, "a frame header");
                        }
                        Err(f)
                    }
                }
            }
            Unfinished::Drop { mut left } => {
                let mut scratch = vec![0u8; (left as usize).min(self.chunk)];
                while left > 0 {
                    let n = (left as usize).min(scratch.len());
                    let mut done = 0;
                    let r = read_full(
                        &self.stream,
                        &mut [&mut scratch[..n]],
                        deadline,
                        self.chunk,
                        &mut done,
                    );
                    left -= done;
                    if let Err(f) = r {
                        let rest = Unfinished::Drop { left };
                        self.stop_mid_frame(role, &f, rest, "a dropped frame");
                        return Err(f);
                    }
                }
                Ok(Finished::Dropped)
            }
            Unfinished::Stash {
                tag,
                mut buf,
                filled,
            } => {
                let mut done = 0;
                let r = read_full(
                    &self.stream,
                    &mut [&mut buf[filled..]],
                    deadline,
                    self.chunk,
                    &mut done,
                );
                let filled = filled + done as usize;
                if let Err(f) = r {
                    if filled == 0 {
                        let len = buf.len() as u64;
                        role.pending = Some(Header { tag, len });
                    } else {
                        let rest = Unfinished::Stash { tag, buf, filled };
                        self.stop_mid_frame(role, &f, rest, "a stashed frame");
                    }
                    return Err(f);
                }
                tracing::trace!(peer = self.peer, tag, len = buf.len(), "stashed frame");
                let mut st = lock(&self.rx);
                // Forgotten while it was being read: nobody will take it.
                if !st.stash.is_forgotten(&buf) {
                    st.stash.push(tag, buf);
                }
                self.rx_cv.notify_all();
                Ok(Finished::Stashed(tag))
            }
        }
    }

    /// Forgets `prefix` ([`super::ProcessGroup::forget_prefix`]): drops its stashed frames now,
    /// and its frames that arrive later in [`read_as_reader`](Self::read_as_reader).
    pub(crate) fn forget(&self, prefix: [u8; 8]) {
        let dropped = lock(&self.rx).stash.forget(prefix);
        if dropped > 0 {
            tracing::debug!(
                peer = self.peer,
                dropped,
                "dropped stashed frames of a forgotten prefix"
            );
        }
    }

    /// Frame `hdr` (first in line, payload unread, at least 8 bytes) is nobody's: peeks at its first
    /// 8 payload bytes and, when they are a forgotten prefix, reads and drops the payload in chunks of
    /// at most `chunk` bytes (true). Otherwise (false) the frame is untouched, still first in line.
    /// Fails as [`finish`](Self::finish) does; before any payload byte is consumed the frame stays
    /// first in line.
    fn drop_if_forgotten(
        &self,
        role: &mut ReaderRole<'_>,
        hdr: Header,
        deadline: Instant,
    ) -> Result<bool, Fail> {
        let mut head = [0u8; 8];
        if let Err(f) = peek_exact(&self.stream, &mut head, deadline) {
            role.pending = Some(hdr);
            return Err(f);
        }
        if !lock(&self.rx).stash.is_forgotten(&head) {
            return Ok(false);
        }
        self.finish(role, Unfinished::Drop { left: hdr.len }, deadline)?;
        tracing::trace!(
            peer = self.peer,
            tag = hdr.tag,
            len = hdr.len,
            "dropped a frame of a forgotten prefix"
        );
        Ok(true)
    }

    fn read_as_reader(
        &self,
        mut role: ReaderRole<'_>,
        tag: u64,
        dest: &mut Dest<'_, '_>,
        deadline: Instant,
        timeout: Duration,
        observe: Option<&mut Observer<'_>>,
    ) -> ReadOutcome {
        use ReadOutcome::Done;
        loop {
            if role.pending.is_none() {
                let frame = role.unfinished.take().unwrap_or(Unfinished::Header {
                    bytes: [0; FRAME_HEADER_LEN],
                    filled: 0,
                });
                match self.finish(&mut role, frame, deadline) {
                    Ok(Finished::Header(h)) => role.pending = Some(h),
                    Ok(Finished::Dropped) => continue,
                    // It may be the frame this receive waits for: look in the stash again.
                    Ok(Finished::Stashed(t)) if t == tag => return ReadOutcome::HandedOff,
                    Ok(Finished::Stashed(_)) => continue,
                    Err(f) => return Done(Err(self.fail_to_err(f, tag, timeout))),
                }
            }
            let hdr = role.pending.take().expect("a header first in line");
            if hdr.tag == tag {
                if let Err(e) = dest.check(self.peer, tag, hdr.len) {
                    role.pending = Some(hdr);
                    return Done(Err(e));
                }
                let mut vec_buf = Vec::new();
                let r = match dest {
                    Dest::Parts(parts) => {
                        self.read_payload(&mut role, hdr, parts, (deadline, timeout), tag, observe)
                    }
                    Dest::Vec { .. } => {
                        vec_buf = vec![0u8; hdr.len as usize];
                        let parts = &mut [&mut vec_buf[..]];
                        self.read_payload(&mut role, hdr, parts, (deadline, timeout), tag, None)
                    }
                };
                return Done(r.map(|()| match dest {
                    Dest::Parts(_) => None,
                    Dest::Vec { .. } => Some(vec_buf),
                }));
            }
            // Somebody else's frame: hand it over, drop it (a forgotten prefix), or stash it.
            {
                let mut st = lock(&self.rx);
                if st.waiting.get(&hdr.tag).is_some_and(|&n| n > 0) {
                    drop(st);
                    role.pending = Some(hdr);
                    role.handoff = true;
                    drop(role);
                    return ReadOutcome::HandedOff;
                }
                if st.stash.forgets_any() && hdr.len >= 8 {
                    drop(st);
                    match self.drop_if_forgotten(&mut role, hdr, deadline) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(f) => return Done(Err(self.fail_to_err(f, tag, timeout))),
                    }
                    st = lock(&self.rx);
                }
                if !st.stash.fits(hdr.len) {
                    let e = PgError::UnexpectedBacklog {
                        peer: self.peer,
                        wanted: tag,
                        blocking_tag: hdr.tag,
                        len: hdr.len,
                        stashed: st.stash.bytes() as u64,
                        limit: st.stash.limit() as u64,
                    };
                    drop(st);
                    role.pending = Some(hdr);
                    return Done(Err(e));
                }
            }
            let frame = Unfinished::Stash {
                tag: hdr.tag,
                buf: vec![0u8; hdr.len as usize],
                filled: 0,
            };
            if let Err(f) = self.finish(&mut role, frame, deadline) {
                return Done(Err(self.fail_to_err(f, tag, timeout)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    const T: Duration = Duration::from_secs(5);

    /// A PeerConn (peer rank 1) and the raw other end of its socket.
    fn conn(stash_limit: usize) -> (PeerConn, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (PeerConn::new(1, s, 1 << 16, stash_limit), raw)
    }

    fn frame(tag: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Header {
            tag,
            len: payload.len() as u64,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn waiting_receiver_gets_frame_handed_over_without_stash() {
        // Stash limit 0: any frame that had to be stashed would fail with UnexpectedBacklog.
        let (c, mut raw) = conn(0);
        std::thread::scope(|s| {
            let wait_for = |what: &dyn Fn(&RxState) -> bool| {
                while !what(&lock(&c.rx)) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            };
            let a = s.spawn(|| c.recv(1, Dest::Vec { max: 1 << 24 }, T));
            wait_for(&|st| st.reader_active); // `a` is the reader, blocked in read
            let b = s.spawn(|| c.recv(2, Dest::Vec { max: 1 << 24 }, T));
            wait_for(&|st| st.waiting.contains_key(&2)); // `b` waits for tag 2
            raw.write_all(&frame(2, &vec![2u8; 4 << 20])).unwrap();
            raw.write_all(&frame(1, b"one")).unwrap();
            assert_eq!(b.join().unwrap().unwrap().unwrap(), vec![2u8; 4 << 20]);
            assert_eq!(a.join().unwrap().unwrap().unwrap(), b"one");
        });
        assert_eq!(lock(&c.rx).stash.bytes(), 0);
    }

    #[test]
    fn timeout_between_header_and_payload_keeps_frame() {
        let (c, mut raw) = conn(1 << 20);
        raw.write_all(&frame(3, b"")).unwrap();
        raw.write_all(&Header { tag: 4, len: 4 }.encode()).unwrap();
        // Tag 3 (empty) arrives complete; tag 4's payload is late.
        let mut buf = [0u8; 4];
        let d = Duration::from_millis(200);
        assert_eq!(c.recv(3, Dest::Vec { max: 0 }, T).unwrap().unwrap(), b"");
        let e = c.recv(4, Dest::Parts(&mut [&mut buf]), d).unwrap_err();
        assert!(e.is_timeout(), "{e}");
        raw.write_all(b"late").unwrap();
        c.recv(4, Dest::Parts(&mut [&mut buf]), T).unwrap();
        assert_eq!(&buf, b"late");
    }

    #[test]
    fn timeout_mid_payload_drops_the_message_and_keeps_the_connection() {
        let (c, mut raw) = conn(1 << 20);
        let f = frame(5, &[9u8; 100]);
        raw.write_all(&f[..50]).unwrap();
        let t0 = Instant::now();
        let d = Duration::from_millis(200);
        let e = c.recv(5, Dest::Vec { max: 100 }, d).unwrap_err();
        assert_eq!(
            e,
            PgError::TimeoutMidMessage {
                peer: 1,
                tag: 5,
                after: d,
                received: 50 - FRAME_HEADER_LEN as u64,
                len: 100
            }
        );
        assert!(e.is_timeout());
        assert!(t0.elapsed() < d + Duration::from_secs(1));
        // The rest of the lost message is dropped; the next one with the same tag is received.
        raw.write_all(&f[50..]).unwrap();
        raw.write_all(&frame(5, b"next")).unwrap();
        assert_eq!(
            c.recv(5, Dest::Vec { max: 100 }, T).unwrap().unwrap(),
            b"next"
        );
        c.send(5, &[b"x"], T).unwrap();
        assert_eq!(lock(&c.rx).stash.bytes(), 0);
    }

    #[test]
    fn timeout_mid_header_keeps_the_frame() {
        let (c, mut raw) = conn(1 << 20);
        let f = frame(6, b"abc");
        raw.write_all(&f[..7]).unwrap();
        let d = Duration::from_millis(100);
        let e = c.recv(6, Dest::Vec { max: 3 }, d).unwrap_err();
        assert_eq!(
            e,
            PgError::Timeout {
                peer: 1,
                tag: 6,
                after: d
            }
        );
        raw.write_all(&f[7..]).unwrap();
        assert_eq!(c.recv(6, Dest::Vec { max: 3 }, T).unwrap().unwrap(), b"abc");
    }

    #[test]
    fn a_frame_being_stashed_at_a_timeout_is_finished_by_the_next_receive() {
        let (c, mut raw) = conn(1 << 20);
        let other = frame(2, &[2u8; 1000]);
        raw.write_all(&other[..300]).unwrap();
        // Waiting for tag 1, the receive starts stashing tag 2's frame and times out in it.
        let e = c
            .recv(1, Dest::Vec { max: 9 }, Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(e, PgError::Timeout { tag: 1, .. }), "{e}");
        raw.write_all(&other[300..]).unwrap();
        raw.write_all(&frame(1, b"one")).unwrap();
        // The receive of tag 2 finishes the frame it is waiting for and takes it from the stash.
        assert_eq!(
            c.recv(2, Dest::Vec { max: 1000 }, T).unwrap().unwrap(),
            vec![2u8; 1000]
        );
        assert_eq!(c.recv(1, Dest::Vec { max: 9 }, T).unwrap().unwrap(), b"one");
        assert_eq!(lock(&c.rx).stash.bytes(), 0);
    }

    #[test]
    fn a_forgotten_frame_being_dropped_at_a_timeout_is_dropped_by_the_next_receive() {
        let (c, mut raw) = conn(1 << 10);
        let prefix = *b"deadbeef";
        c.forget(prefix);
        let mut payload = prefix.to_vec();
        payload.resize(1 << 20, 7); // far above the stash limit
        let late = frame(3, &payload);
        raw.write_all(&late[..(512 << 10)]).unwrap();
        let d = Duration::from_millis(200);
        for _ in 0..2 {
            let e = c.recv(1, Dest::Vec { max: 9 }, d).unwrap_err();
            assert!(matches!(e, PgError::Timeout { tag: 1, .. }), "{e}");
        }
        raw.write_all(&late[(512 << 10)..]).unwrap();
        raw.write_all(&frame(1, b"one")).unwrap();
        assert_eq!(c.recv(1, Dest::Vec { max: 9 }, T).unwrap().unwrap(), b"one");
        assert_eq!(lock(&c.rx).stash.bytes(), 0);
    }

    #[test]
    fn stashed_frames_survive_poisoning() {
        let (c, mut raw) = conn(1 << 20);
        raw.write_all(&frame(1, b"early")).unwrap();
        raw.write_all(&frame(2, b"ab")[..17]).unwrap(); // header + 1 of 2 payload bytes
        drop(raw); // the peer closes in the middle of the frame
        let e = c.recv(2, Dest::Vec { max: 2 }, T).unwrap_err();
        assert_eq!(e, PgError::PeerClosed { peer: 1 });
        assert_eq!(
            c.recv(1, Dest::Vec { max: 9 }, T).unwrap().unwrap(),
            b"early"
        );
        assert_eq!(
            c.recv(1, Dest::Vec { max: 9 }, T).unwrap_err(),
            PgError::Poisoned { peer: 1 }
        );
    }
}
