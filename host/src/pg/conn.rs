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
//! Write side: a timed lock serializes whole messages.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::stash::Stash;
use super::wait_until;
use super::wire::{
    peek_exact, read_full, read_full_observed, read_header, write_full_observed, Fail, Header,
    FRAME_HEADER_LEN,
};
use super::{total_len, Dest, Observer, PgError};

#[derive(Debug)]
struct RxState {
    stash: Stash,
    /// Header of the frame first in line whose payload is still unread.
    pending: Option<Header>,
    reader_active: bool,
    /// The pending frame is reserved for a thread waiting for this tag.
    handoff: Option<u64>,
    /// Threads waiting in `recv`, per tag.
    waiting: HashMap<u64, usize>,
}

/// How a receive's wait for the socket ended.
enum Turn {
    /// This thread reads the socket (starting with the frame header first in line, if one was read).
    Read(Option<Header>),
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
    handoff: bool,
}

impl Drop for ReaderRole<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.conn.rx);
        st.reader_active = false;
        st.pending = self.pending.take();
        if self.handoff {
            // Only while somebody still waits for it: the waiter may have timed out since the
            // reader looked (the last waiter to leave clears a hand-off, but only one already set).
            let tag = st.pending.map(|h| h.tag);
            st.handoff = tag.filter(|t| st.waiting.get(t).is_some_and(|&n| n > 0));
        }
        self.conn.rx_cv.notify_all();
    }
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
                        break Turn::Read(st.pending.take());
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
                    Turn::Read(pending) => ReaderRole {
                        conn: self,
                        pending,
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
    /// it was read; otherwise the stream can't be parsed any more and the connection is poisoned.
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
            if done > 0 {
                self.poison("receive failed in the middle of a frame payload");
            } else {
                role.pending = Some(hdr);
            }
            self.fail_to_err(f, tag, timeout)
        })
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
    /// Fails as [`read_payload`](Self::read_payload) does: before any payload byte is consumed the
    /// frame stays first in line; in the middle of it, the connection is poisoned.
    fn drop_if_forgotten(
        &self,
        role: &mut ReaderRole<'_>,
        hdr: Header,
        deadline: Instant,
        tag: u64,
        timeout: Duration,
    ) -> Result<bool, PgError> {
        let mut head = [0u8; 8];
        if let Err(f) = peek_exact(&self.stream, &mut head, deadline) {
            role.pending = Some(hdr);
            return Err(self.fail_to_err(f, tag, timeout));
        }
        if !lock(&self.rx).stash.is_forgotten(&head) {
            return Ok(false);
        }
        let mut scratch = vec![0u8; (hdr.len as usize).min(self.chunk)];
        let mut left = hdr.len;
        let mut done = 0;
        while left > 0 {
            let n = (left as usize).min(scratch.len());
            if let Err(f) = read_full(
                &self.stream,
                &mut [&mut scratch[..n]],
                deadline,
                self.chunk,
                &mut done,
            ) {
                if done > 0 {
                    self.poison("receive failed in the middle of a forgotten frame");
                } else {
                    role.pending = Some(hdr);
                }
                return Err(self.fail_to_err(f, tag, timeout));
            }
            left -= n as u64;
        }
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
            let hdr = match role.pending.take() {
                Some(h) => h,
                None => {
                    let mut done = 0;
                    match read_header(&self.stream, deadline, &mut done) {
                        Ok(h) => h,
                        Err(f) => {
                            if done > 0 {
                                self.poison("receive failed in the middle of a frame header");
                            }
                            return Done(Err(self.fail_to_err(f, tag, timeout)));
                        }
                    }
                }
            };
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
                    match self.drop_if_forgotten(&mut role, hdr, deadline, tag, timeout) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => return Done(Err(e)),
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
            let mut v = vec![0u8; hdr.len as usize];
            if let Err(e) = self.read_payload(
                &mut role,
                hdr,
                &mut [&mut v[..]],
                (deadline, timeout),
                tag,
                None,
            ) {
                return Done(Err(e));
            }
            tracing::trace!(
                peer = self.peer,
                tag = hdr.tag,
                len = hdr.len,
                "stashed frame"
            );
            let mut st = lock(&self.rx);
            st.stash.push(hdr.tag, v);
            self.rx_cv.notify_all();
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
    fn timeout_mid_payload_poisons() {
        let (c, mut raw) = conn(1 << 20);
        let f = frame(5, &[9u8; 100]);
        raw.write_all(&f[..50]).unwrap();
        let t0 = Instant::now();
        let d = Duration::from_millis(200);
        let e = c.recv(5, Dest::Vec { max: 100 }, d).unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert!(t0.elapsed() < d + Duration::from_secs(1));
        raw.write_all(&f[50..]).unwrap();
        assert_eq!(
            c.recv(5, Dest::Vec { max: 100 }, T).unwrap_err(),
            PgError::Poisoned { peer: 1 }
        );
        assert_eq!(
            c.send(5, &[b"x"], T).unwrap_err(),
            PgError::Poisoned { peer: 1 }
        );
    }

    #[test]
    fn timeout_mid_header_poisons() {
        let (c, mut raw) = conn(1 << 20);
        raw.write_all(&frame(6, b"abc")[..7]).unwrap();
        let e = c
            .recv(6, Dest::Vec { max: 3 }, Duration::from_millis(100))
            .unwrap_err();
        assert!(e.is_timeout());
        assert_eq!(
            c.recv(6, Dest::Vec { max: 3 }, T).unwrap_err(),
            PgError::Poisoned { peer: 1 }
        );
    }

    #[test]
    fn stashed_frames_survive_poisoning() {
        let (c, mut raw) = conn(1 << 20);
        raw.write_all(&frame(1, b"early")).unwrap();
        raw.write_all(&frame(2, b"ab")[..17]).unwrap(); // header + 1 of 2 payload bytes
        let e = c
            .recv(2, Dest::Vec { max: 2 }, Duration::from_millis(100))
            .unwrap_err();
        assert!(e.is_timeout());
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
