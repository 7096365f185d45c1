//! Frame header and deadline-bounded, chunked, vectored socket I/O.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::{Observer, OBSERVE_GRAIN};

/// Size of the frame header: tag (u64 LE) then payload length (u64 LE).
pub const FRAME_HEADER_LEN: usize = 16;

/// At most this many iovecs per system call (IOV_MAX is 1024 on Linux).
const MAX_IOV: usize = 64;

/// Flags for `sendmsg`: a peer that went away must give EPIPE, not kill the process with SIGPIPE
/// (std only ignores SIGPIPE in Rust `main` binaries, not when embedded, e.g. in Python).
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
const SEND_FLAGS: libc::c_int = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub tag: u64,
    pub len: u64,
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Self {
        Header {
            tag: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            len: u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
        }
    }
}

/// Why a deadline-bounded transfer stopped.
#[derive(Debug)]
pub(crate) enum Fail {
    /// Deadline reached.
    Timeout,
    /// Orderly EOF, reset or broken pipe.
    Closed,
    Io(io::Error),
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Timeout => f.write_str("timed out"),
            Fail::Closed => f.write_str("connection closed"),
            Fail::Io(e) => write!(f, "{e}"),
        }
    }
}

impl Fail {
    fn from_io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected => Fail::Closed,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Fail::Timeout,
            _ => Fail::Io(e),
        }
    }
}

/// Time left until `deadline`, at least 1 ms (a zero socket timeout means "block forever"), or
/// `None` once it has passed.
fn remaining(deadline: Instant) -> Option<Duration> {
    let now = Instant::now();
    (now < deadline).then(|| (deadline - now).max(Duration::from_millis(1)))
}

/// Whether an I/O error means "try again": interrupted, or a socket timeout that may have fired a
/// little before our deadline (the deadline check decides).
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Read exactly the total length of `parts` into them, in order, by vectored reads of at most
/// `chunk` bytes, giving up at `deadline`. `done` counts bytes read (also on failure), so the caller
/// can tell a clean timeout from one in the middle of a frame.
pub(crate) fn read_full(
    stream: &TcpStream,
    parts: &mut [&mut [u8]],
    deadline: Instant,
    chunk: usize,
    done: &mut u64,
) -> Result<(), Fail> {
    read_full_observed(stream, parts, deadline, chunk, done, None)
}

/// [`read_full`]; with `observe`, reads take at most [`OBSERVE_GRAIN`] bytes, and each read's bytes
/// are shown to it right after the read.
pub(crate) fn read_full_observed(
    stream: &TcpStream,
    parts: &mut [&mut [u8]],
    deadline: Instant,
    chunk: usize,
    done: &mut u64,
    mut observe: Option<&mut Observer<'_>>,
) -> Result<(), Fail> {
    let chunk = match observe {
        Some(_) => chunk.min(OBSERVE_GRAIN),
        None => chunk,
    };
    let (mut idx, mut off) = (0usize, 0usize);
    loop {
        while idx < parts.len() && off == parts[idx].len() {
            idx += 1;
            off = 0;
        }
        if idx == parts.len() {
            return Ok(());
        }
        let left = remaining(deadline).ok_or(Fail::Timeout)?;
        stream.set_read_timeout(Some(left)).map_err(Fail::Io)?;
        let mut iov: Vec<IoSliceMut<'_>> = Vec::with_capacity((parts.len() - idx).min(MAX_IOV));
        let mut budget = chunk.max(1);
        for (k, p) in parts[idx..].iter_mut().enumerate() {
            let start = if k == 0 { off } else { 0 };
            let take = (p.len() - start).min(budget);
            if take == 0 {
                continue;
            }
            iov.push(IoSliceMut::new(&mut p[start..start + take]));
            budget -= take;
            if budget == 0 || iov.len() == MAX_IOV {
                break;
            }
        }
        let mut s = stream;
        match s.read_vectored(&mut iov) {
            Ok(0) => return Err(Fail::Closed),
            Ok(mut n) => {
                *done += n as u64;
                drop(iov);
                while n > 0 {
                    let step = (parts[idx].len() - off).min(n);
                    if let Some(observe) = observe.as_deref_mut() {
                        observe(idx, &parts[idx][off..off + step]);
                    }
                    off += step;
                    n -= step;
                    if off == parts[idx].len() {
                        idx += 1;
                        off = 0;
                    }
                }
            }
            Err(e) if retry(&e) => {}
            Err(e) => return Err(Fail::from_io(e)),
        }
    }
}

/// Write all of `bufs`, in order, by vectored sends of at most `chunk` bytes, giving up at
/// `deadline`. `done` counts bytes written (also on failure).
pub(crate) fn write_full(
    stream: &TcpStream,
    bufs: &[&[u8]],
    deadline: Instant,
    chunk: usize,
    done: &mut u64,
) -> Result<(), Fail> {
    write_full_observed(stream, bufs, deadline, chunk, done, None)
}

/// [`write_full`]; `observe` is shown each byte once, right before the first send that carries it.
/// Sends are not made smaller for it (unlike [`read_full_observed`]'s reads): on loopback, 256 KiB
/// sends cost the sender 0.1–0.2 CPU·s/GiB more (a wakeup and the receive path's softirq per send)
/// than the cache-hot copy saved, and the observer's read is the first read of the bytes (DRAM
/// speed) whatever the grain.
pub(crate) fn write_full_observed(
    stream: &TcpStream,
    bufs: &[&[u8]],
    deadline: Instant,
    chunk: usize,
    done: &mut u64,
    mut observe: Option<&mut Observer<'_>>,
) -> Result<(), Fail> {
    let sock = SockRef::from(stream);
    let (mut idx, mut off) = (0usize, 0usize);
    // Where the observer has got to: a short send leaves bytes it has seen to the next send.
    let (mut seen_idx, mut seen_off) = (0usize, 0usize);
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len().min(MAX_IOV));
    loop {
        while idx < bufs.len() && off == bufs[idx].len() {
            idx += 1;
            off = 0;
        }
        if idx == bufs.len() {
            return Ok(());
        }
        let left = remaining(deadline).ok_or(Fail::Timeout)?;
        stream.set_write_timeout(Some(left)).map_err(Fail::Io)?;
        iov.clear();
        let mut budget = chunk.max(1);
        for (k, b) in bufs[idx..].iter().enumerate() {
            let start = if k == 0 { off } else { 0 };
            let take = (b.len() - start).min(budget);
            if take == 0 {
                continue;
            }
            iov.push(IoSlice::new(&b[start..start + take]));
            if let Some(observe) = observe.as_deref_mut() {
                let i = idx + k;
                if (i, start + take) > (seen_idx, seen_off) {
                    let from = if i == seen_idx {
                        seen_off.max(start)
                    } else {
                        start
                    };
                    observe(i, &b[from..start + take]);
                    (seen_idx, seen_off) = (i, start + take);
                }
            }
            budget -= take;
            if budget == 0 || iov.len() == MAX_IOV {
                break;
            }
        }
        match sock.send_vectored_with_flags(&iov, SEND_FLAGS) {
            Ok(0) => return Err(Fail::Closed),
            Ok(mut n) => {
                *done += n as u64;
                while n > 0 {
                    let step = (bufs[idx].len() - off).min(n);
                    off += step;
                    n -= step;
                    if off == bufs[idx].len() {
                        idx += 1;
                        off = 0;
                    }
                }
            }
            Err(e) if retry(&e) => {}
            Err(e) => return Err(Fail::from_io(e)),
        }
    }
}

/// Fill `buf` with the next bytes of the stream without consuming them (`MSG_PEEK`), giving up at
/// `deadline`. Used to look at a payload's first bytes while its frame stays first in line. The
/// kernel hands a peek whatever has arrived; when that is less than `buf` (the sender's write was
/// split), it looks again shortly.
pub(crate) fn peek_exact(
    stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), Fail> {
    loop {
        let left = remaining(deadline).ok_or(Fail::Timeout)?;
        stream.set_read_timeout(Some(left)).map_err(Fail::Io)?;
        match stream.peek(buf) {
            Ok(0) if !buf.is_empty() => return Err(Fail::Closed),
            Ok(n) if n >= buf.len() => return Ok(()),
            Ok(_) => std::thread::sleep(Duration::from_micros(200).min(left)),
            Err(e) if retry(&e) => {}
            Err(e) => return Err(Fail::from_io(e)),
        }
    }
}

/// Read one frame header; `done` as in [`read_full`].
pub(crate) fn read_header(
    stream: &TcpStream,
    deadline: Instant,
    done: &mut u64,
) -> Result<Header, Fail> {
    let mut b = [0u8; FRAME_HEADER_LEN];
    read_full(stream, &mut [&mut b[..]], deadline, FRAME_HEADER_LEN, done)?;
    Ok(Header::decode(&b))
}

/// Write one whole frame (used for small control messages during setup).
pub(crate) fn write_frame(
    stream: &TcpStream,
    tag: u64,
    payload: &[u8],
    deadline: Instant,
) -> Result<(), Fail> {
    let h = Header {
        tag,
        len: payload.len() as u64,
    }
    .encode();
    write_full(stream, &[&h, payload], deadline, usize::MAX, &mut 0)
}

/// Read one whole frame of at most `max` bytes (setup control messages). Returns (tag, payload).
pub(crate) fn read_frame(
    stream: &TcpStream,
    max: usize,
    deadline: Instant,
) -> Result<(u64, Vec<u8>), Fail> {
    let h = read_header(stream, deadline, &mut 0)?;
    if h.len > max as u64 {
        return Err(Fail::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("control frame of {} bytes exceeds {max}", h.len),
        )));
    }
    let mut v = vec![0u8; h.len as usize];
    read_full(stream, &mut [&mut v[..]], deadline, usize::MAX, &mut 0)?;
    Ok((h.tag, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn header_roundtrip_is_little_endian() {
        let h = Header {
            tag: 0x0102_0304_0506_0708,
            len: 42,
        };
        let b = h.encode();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 42);
        assert_eq!(Header::decode(&b), h);
    }

    #[test]
    fn vectored_scatter_gather_with_small_chunks() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let d2 = data.clone();
        let t = std::thread::spawn(move || {
            let s = TcpStream::connect(addr).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut done = 0;
            let parts: [&[u8]; 4] = [&d2[..1], &[], &d2[1..70_000], &d2[70_000..]];
            write_full(&s, &parts, deadline, 4096, &mut done).unwrap();
            assert_eq!(done, 100_000);
        });
        let (s, _) = l.accept().unwrap();
        let mut out = vec![0u8; 100_000];
        let (a, rest) = out.split_at_mut(3);
        let (b, c) = rest.split_at_mut(50_000);
        let mut done = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        read_full(&s, &mut [a, &mut [], b, c], deadline, 1000, &mut done).unwrap();
        assert_eq!(done, 100_000);
        assert_eq!(out, data);
        t.join().unwrap();
        // Peer gone: clean EOF.
        let r = read_full(&s, &mut [&mut [0u8; 1][..]], deadline, 1, &mut done);
        assert!(matches!(r, Err(Fail::Closed)));
    }

    /// What an observer saw, per part, concatenated; and the largest piece it was shown.
    fn seen(parts: usize) -> (Vec<Vec<u8>>, usize) {
        (vec![Vec::new(); parts], 0)
    }

    #[test]
    fn observers_see_every_byte_once_in_order() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // Larger than the socket buffers, so that sends come back short; parts of odd sizes.
        let data: Vec<u8> = (0..9_000_017u32).map(|i| (i % 253) as u8).collect();
        let cuts = [0, 1, 1, 300_001, 8_000_000, data.len()];
        let d2 = data.clone();
        let t = std::thread::spawn(move || {
            let s = TcpStream::connect(addr).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            let parts: Vec<&[u8]> = cuts.windows(2).map(|w| &d2[w[0]..w[1]]).collect();
            let (mut got, mut largest) = seen(parts.len());
            let mut observe = |i: usize, piece: &[u8]| {
                got[i].extend_from_slice(piece);
                largest = largest.max(piece.len());
            };
            let mut done = 0;
            write_full_observed(&s, &parts, deadline, 1 << 20, &mut done, Some(&mut observe))
                .unwrap();
            assert_eq!(done, d2.len() as u64);
            for (g, p) in got.iter().zip(&parts) {
                assert_eq!(g, p);
            }
            assert!(largest <= 1 << 20, "a piece of {largest} bytes");
        });
        let (s, _) = l.accept().unwrap();
        let mut out = vec![0u8; data.len()];
        let mut parts: Vec<&mut [u8]> = Vec::new();
        let mut rest = &mut out[..];
        for w in cuts.windows(2) {
            let (a, b) = rest.split_at_mut(w[1] - w[0]);
            parts.push(a);
            rest = b;
        }
        let (mut got, mut largest) = seen(parts.len());
        let mut observe = |i: usize, piece: &[u8]| {
            got[i].extend_from_slice(piece);
            largest = largest.max(piece.len());
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        read_full_observed(
            &s,
            &mut parts,
            deadline,
            4 << 20,
            &mut 0,
            Some(&mut observe),
        )
        .unwrap();
        t.join().unwrap();
        assert_eq!(out, data);
        for (g, w) in got.iter().zip(cuts.windows(2)) {
            assert_eq!(g[..], data[w[0]..w[1]]);
        }
        assert!(largest <= OBSERVE_GRAIN, "a piece of {largest} bytes");
    }
}
