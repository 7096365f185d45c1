//! Receive buffers: owned, zero-initialised, aligned allocations ([`Buffer`]); a background
//! pre-faulter that maps fresh buffers' pages while the receiver is busy on the wire
//! ([`ReceiveMemory`], which also shares a receive's buffers between its threads); and a bounded pool that keeps touched buffers between transfers
//! ([`BufferPool`]).
//!
//! # Why
//! A receiver writes tensor bytes straight into their final buffers. Fresh anonymous memory is
//! page-fault bound: every first write to a page traps into the kernel, which allocates and zeroes
//! a page (and, on a VM, the hypervisor may have to back it too). Done inline by the receiving
//! thread, that work serialises with the copy out of the socket. [`ReceiveMemory`] moves it to one
//! background thread that walks the buffers in receive order just ahead of the receiver, with
//! `MADV_POPULATE_WRITE` (Linux ≥ 5.14; `mlock`+`munlock` before that), which maps pages writable
//! without changing contents, in the kernel, without one trap per page.
//!
//! The measurements behind these choices (fault cost per GiB, huge vs base pages on this VM, receiving
//! over loopback into fresh, prefaulted and pooled memory) are in `docs/perf.md`.
//!
//! # Recommended use by a receiver
//! 1. Right after the metadata, allocate every fresh destination with [`Buffer::zeroed`] (an
//!    `mmap` per buffer of 1 MiB or more: no page is touched yet) and the smaller ones together
//!    with [`Buffer::zeroed_many`] (one `mmap` carved up; the global allocator would write zeros
//!    over them: 0.17–0.19 s for the 10,220-leaf reference dict, measured, against 2.5 ms), or
//!    take them from a [`BufferPool`] when the process receives checkpoints of the same shapes
//!    repeatedly.
//! 2. Hand them to [`ReceiveMemory::new`] **in receive order** (storage wire order) before the first
//!    data message, as [`Target::Fresh`]; in-place destinations and pooled buffers need no
//!    prefaulting ([`Target::Borrowed`], [`Target::Touched`]).
//! 3. Receive each message through [`ReceiveMemory::write`]; other threads read what has landed
//!    with [`ReceiveMemory::read`].
//! 4. [`ReceiveMemory::finish`] gives the buffers back. Memory stays bounded by the buffers' size:
//!    the prefaulter maps nothing else. And it follows the data: the prefaulter stays at most
//!    [`PrefaultOptions::window`] bytes ahead of the receiver, so memory announced and never sent is
//!    never faulted in.

use std::alloc::{self, Layout};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut, Range};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;

/// Every [`Buffer`] is aligned to at least this many bytes (a cache line; any dtype).
pub const MIN_ALIGN: usize = 64;

/// Buffers of at least this many bytes get their own anonymous `mmap` (page aligned, returned to
/// the OS on drop); smaller ones come from the global allocator (64-byte aligned).
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// Size of a transparent huge page (x86-64 and arm64 with 4 KiB base pages). Huge-page buffers
/// are aligned to it so that every whole 2 MiB of them can be one huge page.
pub const HUGE_PAGE: usize = 2 << 20;

/// The base page size of this system.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            n as usize
        } else {
            4096
        }
    })
}

/// Bytes of physical memory of this system (`_SC_PHYS_PAGES` × page size), if it says.
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads a system constant.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    u64::try_from(pages)
        .ok()
        .filter(|&p| p > 0)
        .map(|p| p.saturating_mul(page_size() as u64))
}

/// The default receive memory budget: half of physical memory (no bound where the system does not
/// say how much it has).
pub fn default_memory_budget() -> u64 {
    physical_memory().map_or(u64::MAX, |m| m / 2)
}

/// What pages back a mapped (≥ [`MMAP_THRESHOLD`]) buffer. Smaller buffers ignore it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Pages {
    /// No advice: the system's THP policy decides (`madvise` mode: base pages; `always`: huge
    /// pages). Mappings of at least [`HUGE_PAGE`] bytes are 2 MiB aligned so that either works.
    /// The default, because in `madvise` mode it gives base pages, which measured best here:
    /// huge pages fault 4× faster than base pages on memory freed moments ago, but 4× *slower*
    /// on long-free ("cold") memory, which is what fresh buffers normally get (`docs/perf.md`).
    #[default]
    Auto,
    /// Base pages (`MADV_NOHUGEPAGE`).
    Small,
    /// Transparent huge pages where the kernel can find them (`MADV_HUGEPAGE`, 2 MiB aligned).
    /// Worth it on bare metal, or where freed memory is not handed back to a hypervisor.
    Huge,
}

#[derive(Debug)]
enum Backing {
    /// Zero length: a dangling, aligned pointer.
    Empty,
    /// From the global allocator with this layout.
    Heap(Layout),
    /// An anonymous mapping of `len` bytes (a multiple of the page size) at `ptr`.
    Map { len: usize, pages: Pages },
    /// Bytes of a mapping shared with other buffers carved from it ([`Buffer::zeroed_many`]);
    /// no two of them overlap.
    Carved {
        /// Kept for its `Drop`, which unmaps the mapping after its last buffer.
        _map: Arc<SharedMap>,
    },
}

/// An anonymous mapping that [`Buffer::zeroed_many`] carved buffers from; unmapped when the last
/// of them is dropped.
#[derive(Debug)]
struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: only the address is kept, to unmap it; the bytes belong to the carved buffers.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping of exactly `len` bytes, unmapped once (here), after every buffer
        // carved from it (each holds an `Arc` to this) is gone.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// An owned, zero-initialised byte buffer, at least [`MIN_ALIGN`]-aligned (page aligned when
/// mapped, [`HUGE_PAGE`] aligned when huge). Like `Box<[u8]>`, but allocation never touches the
/// memory: a large buffer is a fresh anonymous mapping whose pages the kernel supplies, zeroed, on
/// first access (see [`ReceiveMemory`] to take that cost off the receiving thread).
pub struct Buffer {
    /// Valid for reads and writes of `len` bytes, all initialised; owned by this value alone.
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: `Buffer` owns its allocation exclusively (like `Box<[u8]>`); `&Buffer` only reads it.
unsafe impl Send for Buffer {}
// SAFETY: as above: shared references give read-only access to plain bytes.
unsafe impl Sync for Buffer {}

impl Buffer {
    /// A zero-filled buffer of `len` bytes with the default [`Pages::Auto`]. Aborts on allocation
    /// failure, like `Vec`.
    pub fn zeroed(len: usize) -> Buffer {
        Buffer::zeroed_with(len, Pages::Auto)
    }

    /// A zero-filled buffer of `len` bytes backed by `pages`. Aborts on allocation failure.
    pub fn zeroed_with(len: usize, pages: Pages) -> Buffer {
        match Buffer::try_zeroed_with(len, pages) {
            Ok(b) => b,
            Err(e) => match Layout::from_size_align(len, MIN_ALIGN) {
                Ok(layout) => alloc::handle_alloc_error(layout),
                Err(_) => panic!("Buffer of {len} bytes: {e}"),
            },
        }
    }

    /// A zero-filled buffer of `len` bytes, or the allocation error.
    pub fn try_zeroed(len: usize) -> io::Result<Buffer> {
        Buffer::try_zeroed_with(len, Pages::Auto)
    }

    /// A zero-filled buffer of `len` bytes backed by `pages`, or the allocation error.
    pub fn try_zeroed_with(len: usize, pages: Pages) -> io::Result<Buffer> {
        if len == 0 {
            return Ok(Buffer {
                ptr: NonNull::new(ptr::without_provenance_mut(MIN_ALIGN)).expect("non-null"),
                len: 0,
                backing: Backing::Empty,
            });
        }
        if len < MMAP_THRESHOLD {
            let layout = Layout::from_size_align(len, MIN_ALIGN)
                .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
            // SAFETY: `layout` has a non-zero size.
            let p = unsafe { alloc::alloc_zeroed(layout) };
            let ptr = NonNull::new(p).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
            return Ok(Buffer {
                ptr,
                len,
                backing: Backing::Heap(layout),
            });
        }
        let (ptr, map_len) = map_anon(len, pages)?;
        Ok(Buffer {
            ptr,
            len,
            backing: Backing::Map {
                len: map_len,
                pages,
            },
        })
    }

    /// Zero-filled buffers of the given lengths (each [`MIN_ALIGN`]-aligned), carved from one
    /// fresh mapping, so that allocating them touches no memory however small they are (small
    /// [`Buffer::zeroed`] buffers come from the global allocator, which writes zeros over them).
    /// For many buffers that live and die together, like a received checkpoint's storages: the
    /// mapping is unmapped when the last of them is dropped; dropping one earlier returns only the
    /// whole pages inside it.
    pub fn zeroed_many(lens: &[usize]) -> io::Result<Vec<Buffer>> {
        let oom = || io::Error::from(io::ErrorKind::OutOfMemory);
        let mut offsets = Vec::with_capacity(lens.len());
        let mut total = 0usize;
        for &len in lens {
            offsets.push(total);
            total = total
                .checked_add(len)
                .and_then(|t| t.checked_next_multiple_of(MIN_ALIGN))
                .ok_or_else(oom)?;
        }
        if total == 0 {
            return Ok(lens.iter().map(|_| Buffer::zeroed(0)).collect());
        }
        let (ptr, map_len) = map_anon(total, Pages::Auto)?;
        let map = Arc::new(SharedMap { ptr, len: map_len });
        Ok(lens
            .iter()
            .zip(offsets)
            .map(|(&len, offset)| {
                if len == 0 {
                    return Buffer::zeroed(0);
                }
                Buffer {
                    // SAFETY: `offset + len <= total <= map_len`: inside the mapping.
                    ptr: unsafe { ptr.add(offset) },
                    len,
                    backing: Backing::Carved {
                        _map: Arc::clone(&map),
                    },
                }
            })
            .collect())
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Buffer {
        let mut b = Buffer::zeroed(bytes.len());
        b.copy_from_slice(bytes);
        b
    }

    /// A buffer holding the bytes of `v` (copied: a `Vec` is not aligned enough to adopt).
    pub fn from_vec(v: Vec<u8>) -> Buffer {
        Buffer::from_slice(&v)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the buffer is its own anonymous mapping advised to use transparent huge pages
    /// ([`Pages::Huge`]).
    pub fn is_huge(&self) -> bool {
        matches!(
            &self.backing,
            Backing::Map {
                pages: Pages::Huge,
                ..
            }
        )
    }

    /// Whether the buffer lies in an anonymous mapping of its own or carved from one shared
    /// ([`Buffer::zeroed_many`]), as opposed to a global-allocator block.
    pub fn is_mapped(&self) -> bool {
        matches!(self.backing, Backing::Map { .. } | Backing::Carved { .. })
    }

    /// The address of the mapping this buffer was carved from ([`Buffer::zeroed_many`]), if it was.
    fn carved_from(&self) -> Option<usize> {
        match &self.backing {
            Backing::Carved { _map } => Some(_map.ptr.as_ptr().addr()),
            _ => None,
        }
    }

    /// Raw pointer to the first byte, without creating a reference to the contents.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Address and length of the pages spanned by the contents, for page-granular system calls.
    fn page_span(&self) -> (usize, usize) {
        if self.len == 0 {
            return (0, 0);
        }
        let page = page_size();
        let start = self.ptr.as_ptr().addr();
        let lo = start / page * page;
        let hi = (start + self.len).next_multiple_of(page);
        (lo, hi - lo)
    }
}

/// Maps `len` bytes (rounded up to pages) of fresh anonymous memory, advised as `pages` says and
/// 2 MiB aligned unless `Small` or shorter than that. Returns the start and the mapping's length.
fn map_anon(len: usize, pages: Pages) -> io::Result<(NonNull<u8>, usize)> {
    let page = page_size();
    let oom = || io::Error::from(io::ErrorKind::OutOfMemory);
    let map_len = len.checked_next_multiple_of(page).ok_or_else(oom)?;
    // Miri models a mapping as one allocation that can only be unmapped whole (a partial `munmap`
    // is reported as a deallocation with the wrong layout), and its `mmap` aligns to pages: under
    // Miri, mappings are page aligned only, so that nothing below is trimmed (`docs/miri.md`).
    let align = if pages != Pages::Small && len >= HUGE_PAGE && !cfg!(miri) {
        HUGE_PAGE.max(page)
    } else {
        page
    };
    let reserve = map_len.checked_add(align - page).ok_or_else(oom)?;
    // SAFETY: a new private anonymous mapping at an address the kernel picks: no existing memory
    // is affected.
    let base = unsafe {
        libc::mmap(
            ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base.cast::<u8>();
    let head = base.addr().next_multiple_of(align) - base.addr();
    let tail = reserve - head - map_len;
    // SAFETY: `head ≤ align - page` and `head + map_len + tail == reserve`, so both trims lie
    // inside the mapping just made, which nothing else refers to; madvise only gives advice.
    let start = unsafe {
        if head > 0 {
            libc::munmap(base.cast(), head);
        }
        let start = base.add(head);
        if tail > 0 {
            libc::munmap(start.add(map_len).cast(), tail);
        }
        // Advice only (Miri has no `madvise`; it changes no contents).
        #[cfg(all(target_os = "linux", not(miri)))]
        match pages {
            Pages::Auto => 0,
            Pages::Small => libc::madvise(start.cast(), map_len, libc::MADV_NOHUGEPAGE),
            Pages::Huge => libc::madvise(start.cast(), map_len, libc::MADV_HUGEPAGE),
        };
        start
    };
    Ok((
        NonNull::new(start).expect("mmap never returns null"),
        map_len,
    ))
}

impl Drop for Buffer {
    fn drop(&mut self) {
        match &self.backing {
            Backing::Empty => {}
            // SAFETY: allocated by `alloc_zeroed` with this very layout, freed once (here).
            Backing::Heap(layout) => unsafe { alloc::dealloc(self.ptr.as_ptr(), *layout) },
            Backing::Map { len, .. } => {
                // SAFETY: our own mapping of exactly `len` bytes at `ptr`, unmapped once (here).
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), *len) };
            }
            Backing::Carved { .. } => {
                // Hand back the whole pages inside this buffer now; the `Arc` unmaps the rest
                // with the last buffer.
                let page = page_size();
                let start = self.ptr.as_ptr().addr();
                let lo = start.next_multiple_of(page);
                let hi = (start + self.len) / page * page;
                if hi > lo {
                    let p = self.ptr.as_ptr().with_addr(lo);
                    #[cfg(not(miri))]
                    {
                        // SAFETY: `lo..hi` are whole pages inside this buffer's own bytes, which
                        // no other buffer overlaps and nothing reads after this drop; MADV_DONTNEED
                        // on a private anonymous mapping just returns them (zeroed on any later
                        // touch).
                        unsafe { libc::madvise(p.cast(), hi - lo, libc::MADV_DONTNEED) };
                    }
                    #[cfg(miri)]
                    {
                        // Miri has no `madvise`; what the program could see of MADV_DONTNEED, the
                        // pages reading as zero, is a write of zeros through this buffer's
                        // pointer, which Miri checks is this buffer's alone to make.
                        // SAFETY: as above, `lo..hi` lies inside this buffer's own bytes.
                        unsafe { p.write_bytes(0, hi - lo) };
                    }
                }
            }
        }
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes for as long as `self` lives; shared
        // access through `&self` only.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for Buffer {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Clone for Buffer {
    /// A deep copy, backed like the original.
    fn clone(&self) -> Buffer {
        let pages = match &self.backing {
            Backing::Map { pages, .. } => *pages,
            _ => Pages::Auto,
        };
        let mut b = Buffer::zeroed_with(self.len, pages);
        b.copy_from_slice(self);
        b
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.len)
            .field("backing", &self.backing)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// ReceiveMemory and its prefaulter
// ---------------------------------------------------------------------------------------------

/// How the prefaulter of a [`ReceiveMemory`] maps pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PrefaultMethod {
    /// `madvise(MADV_POPULATE_WRITE)` (Linux ≥ 5.14): the kernel faults the range in writable and
    /// never changes its contents, so it may run over bytes the receiver is writing.
    PopulateWrite,
    /// Fallback for older kernels: `mlock` then `munlock` each piece (of at most a quarter of
    /// `RLIMIT_MEMLOCK`). Locking a private writable mapping write-faults its pages in, without
    /// changing contents. Only for mapped buffers (those from the global allocator are left to
    /// the receiver); it undoes any `mlock` the program itself put on those buffers.
    Mlock,
    /// Last resort: an atomic `compare_exchange(0, 0)` on one byte per page (a write access that
    /// leaves the byte as it was), only on bytes not yet claimed, under a lock claims also take.
    Touch,
}

impl PrefaultMethod {
    /// Whether this system supports the method.
    pub fn is_supported(self) -> bool {
        match self {
            PrefaultMethod::PopulateWrite => populate_write_supported(),
            PrefaultMethod::Mlock => mlock_step() > 0,
            PrefaultMethod::Touch => true,
        }
    }

    /// The best supported method: `PopulateWrite`, else `Mlock`, else `Touch`.
    pub fn best() -> PrefaultMethod {
        [PrefaultMethod::PopulateWrite, PrefaultMethod::Mlock]
            .into_iter()
            .find(|m| m.is_supported())
            .unwrap_or(PrefaultMethod::Touch)
    }
}

/// Largest piece `Mlock` locks at once: a quarter of `RLIMIT_MEMLOCK` in whole pages (0: unusable).
fn mlock_step() -> usize {
    // Miri cannot run `getrlimit`/`mlock`: no `Mlock` there (`docs/miri.md`).
    if cfg!(miri) {
        return 0;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into `lim`, a valid, exclusively borrowed struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        return usize::MAX / 2;
    }
    let page = page_size();
    let quarter = usize::try_from(lim.rlim_cur / 4).unwrap_or(usize::MAX / 2);
    quarter / page * page
}

/// Whether `MADV_POPULATE_WRITE` is available (probed once with an empty range).
pub fn populate_write_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        // Miri has no `madvise`: `Touch` there (`docs/miri.md`).
        #[cfg(all(target_os = "linux", not(miri)))]
        {
            // SAFETY: an empty range at a page-aligned address: the kernel validates the advice
            // and returns without touching any memory.
            let r = unsafe {
                libc::madvise(
                    ptr::without_provenance_mut(page_size()),
                    0,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            r == 0
        }
        #[cfg(any(not(target_os = "linux"), miri))]
        false
    })
}

/// Prefaulter settings of a [`ReceiveMemory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefaultOptions {
    /// `None`, or a method this system doesn't support: [`PrefaultMethod::best`].
    pub method: Option<PrefaultMethod>,
    /// Bytes per step (one `madvise`, or one locked batch of touches); the prefaulter checks for
    /// stop and for the receiver's position between steps. Rounded up to pages.
    pub step: usize,
    /// The prefaulter stays at most this many bytes (in receive order) ahead of where the receiver
    /// last started writing, and waits there: memory follows the data, so a sender that announces
    /// storages and sends nothing costs the receiver at most this much faulted memory.
    /// [`DEFAULT_PREFAULT_WINDOW`] by default; `usize::MAX`: no bound.
    pub window: usize,
}

/// The default [`PrefaultOptions::window`]: 32 MiB, 8 default chunks, some 10 ms of receiving at
/// 3 GB/s — far enough ahead that the receiver does not catch up with the prefaulter (which faults
/// pages several times faster than data arrives), and small enough that the window and the process's
/// own memory stay within issue 10's bound of 64 MiB beyond the bytes received, whatever a sender
/// announces (`host/tests/cli_catalogue.rs` measures it; with 64 MiB, a `pgt recv` that was sent
/// nothing peaked at 82 MiB).
pub const DEFAULT_PREFAULT_WINDOW: usize = 32 << 20;

impl Default for PrefaultOptions {
    fn default() -> PrefaultOptions {
        PrefaultOptions {
            method: None,
            step: HUGE_PAGE,
            window: DEFAULT_PREFAULT_WINDOW,
        }
    }
}

/// One region as the background thread and the frontiers see it.
#[derive(Debug)]
struct Region {
    /// The first byte, with the provenance of the whole region: every slice handed out and every
    /// byte the `Touch` prefaulter reaches derive from it (strict provenance, so that Miri follows
    /// each of them: `docs/miri.md`).
    base: NonNull<u8>,
    /// Its address, for the page arithmetic.
    addr: usize,
    len: usize,
    /// Page-rounded span for `madvise`.
    span: (usize, usize),
    /// The mapping the region was carved from with others ([`Buffer::zeroed_many`]): the
    /// prefaulter populates neighbours in it with one call.
    carved_from: Option<usize>,
    /// Whether the buffer is its own mapping (`Mlock` only handles those).
    mapped: bool,
    /// Whether the background thread prefaults this region (fresh memory).
    prefault: bool,
    /// Offset of this region in receive order (sum of the earlier prefaulted regions' lengths).
    start: u64,
    /// Every byte handed out for writing lies below this. Changed under `writes` (and
    /// `Shared::lock` in `Touch` mode, under which the prefaulter reads it).
    claimed: AtomicUsize,
    /// Every byte below this has been written (or skipped) by writes that have all returned, and
    /// may be read; nothing below it is written again. Stored under `writes`.
    landed: AtomicUsize,
    /// The writes of this region in flight.
    writes: Mutex<Writes>,
}

// SAFETY: `base` is an address shared by the threads of a `ReceiveMemory`, which reach the region's
// bytes through it only as the soundness section of `ReceiveMemory` says (disjoint claims, reads
// below `landed`, the `Touch` prefaulter above `claimed` under the lock).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

/// The writes of one region handed out and not yet returned. Claims go up the region, but writes
/// on different threads may return in any order: the region lands only when none is in flight.
#[derive(Debug, Default)]
struct Writes {
    /// Claims handed out and not yet returned (or given back).
    in_flight: usize,
    /// The furthest end of the returned writes.
    end: usize,
}

impl Region {
    fn writes(&self) -> MutexGuard<'_, Writes> {
        self.writes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lands what the returned writes cover once no write of the region is in flight.
    fn settle(&self, w: &Writes) {
        if w.in_flight == 0 {
            self.landed.store(w.end, Ordering::Release);
        }
    }
}

#[derive(Debug)]
struct Shared {
    regions: Vec<Region>,
    /// Total bytes of the prefaulted regions.
    total: u64,
    method: PrefaultMethod,
    step: usize,
    /// `Mlock`: largest piece locked at once.
    mlock_step: usize,
    stop: AtomicBool,
    /// Set (Release) when the background thread is done, so that `prefault_done` (Acquire) also
    /// makes its last counts visible (`JoinHandle::is_finished` does not synchronise).
    done: AtomicBool,
    /// Where (in receive order) the receiver last started writing; the prefaulter jumps past it, and
    /// stays at most `window` bytes ahead of it.
    hint: AtomicU64,
    /// See [`PrefaultOptions::window`].
    window: u64,
    /// Set by the prefaulter while it waits for the receiver (`claim` then wakes it).
    waiting: AtomicBool,
    /// The `hint` the waiting prefaulter last saw: claims wake it once the receiver has moved a
    /// `step` past it (or when they wait for it), not at every claim — 10,000 wake-ups and as many
    /// one-storage steps for `small` (issue 11 item 2).
    parked_hint: AtomicU64,
    /// How far (in receive order) the prefaulter has got. Stored with Release after adding to
    /// `prefaulted`, so that a reader of `progress` (Acquire) sees those counts.
    progress: AtomicU64,
    /// Bytes actually prefaulted (skipped ranges not counted).
    prefaulted: AtomicU64,
    /// `Touch` mode: held by the prefaulter while it touches a step, and by claims.
    lock: Mutex<()>,
    /// The least `progress` a claim blocked in `wait_for_prefaulter` waits for (`u64::MAX`: none);
    /// the prefaulter wakes the blocked claims once it gets there, not at every step. Lowered and
    /// reset under `woken`.
    wanted: AtomicU64,
    /// Where blocked claims wait for `advanced`.
    woken: Mutex<()>,
    advanced: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes the prefaulter's progress and wakes the claims waiting for it, once the first
    /// of them can go. SeqCst pairs with `wait_for_prefaulter`, which lowers `wanted` and then
    /// reads `progress`: here `progress` is stored and then `wanted` read, so one sees the other.
    fn advance(&self, pos: u64) {
        self.progress.store(pos, Ordering::SeqCst);
        if self.wanted.load(Ordering::SeqCst) <= pos {
            let _woken = self.woken.lock().unwrap_or_else(PoisonError::into_inner);
            // Every blocked claim wakes and lowers it again if it has further to wait.
            self.wanted.store(u64::MAX, Ordering::SeqCst);
            self.advanced.notify_all();
        }
    }

    /// Marks the prefaulter done (however it ends) and wakes every waiting claim.
    fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        let _woken = self.woken.lock().unwrap_or_else(PoisonError::into_inner);
        self.advanced.notify_all();
    }
}

/// What the prefaulter of a [`ReceiveMemory`] has done so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefaultStats {
    /// The method in use.
    pub method: PrefaultMethod,
    /// Bytes, in receive order, the prefaulter has passed (prefaulted or skipped).
    pub progress: u64,
    /// Bytes it actually prefaulted (not those it skipped because the receiver was there first).
    pub prefaulted: u64,
    /// Total bytes of all prefaulted regions.
    pub total: u64,
}

/// A region of a [`ReceiveMemory`]: where one storage's bytes (or a cast storage's converted bytes)
/// go.
#[derive(Debug)]
pub enum Target<'a> {
    /// Fresh memory: prefaulted in the background, in the order the regions are given.
    Fresh(Buffer),
    /// Memory already touched (from a [`BufferPool`]): not prefaulted.
    Touched(Buffer),
    /// The caller's own memory (an in-place receive), borrowed for the receive.
    Borrowed(&'a mut [u8]),
}

/// Writing a range outside its region, or over bytes already handed out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("receive memory: bytes {range:?} of region {region} ({len} bytes) are out of bounds or already written")]
pub struct ClaimError {
    /// The region.
    pub region: usize,
    /// The range asked for.
    pub range: Range<usize>,
    /// The region's length.
    pub len: usize,
}

/// The memory of one receive, shared by the threads that move its bytes: the receiving thread writes
/// each message's ranges once, through [`write`](Self::write); other threads read ranges that have
/// landed, through [`read`](Self::read); and a background thread prefaults the fresh regions' pages
/// just ahead of the receiver, in receive order, so that page faults stay off the wire's critical
/// path, never more than [`PrefaultOptions::window`] bytes ahead of the receiver. This is the only
/// place receive memory is reached through raw pointers.
///
/// # Soundness
/// Each region has two frontiers. `claimed`: every byte handed out for writing lies below it, and a
/// non-empty write is handed out only at or above it (moving it up, under the region's `writes`
/// lock), so no two writable slices overlap. `landed`: stored (Release) only by
/// [`write`](Self::write), after its closure has returned and its slices are gone, and only when no
/// other write of the region is in flight (counted under the same lock), to the furthest end written:
/// every byte below it was written by a write that has returned, or skipped; empty ranges neither
/// claim nor land. [`read`](Self::read) hands out bytes only below `landed` (Acquire), and writes
/// never go below `claimed` ≥ `landed`, so a byte is never read while it can be written. Owned
/// buffers are never dereferenced while the memory is shared (only their addresses are used), and
/// they do not move (heap blocks or mappings); borrowed ones are held for `'a`.
///
/// The prefaulter thread holds addresses, never references, and:
/// - with [`PrefaultMethod::PopulateWrite`] and [`PrefaultMethod::Mlock`] it performs no memory
///   access at all: the kernel maps pages writable and leaves their contents alone;
/// - with [`PrefaultMethod::Touch`] it accesses (with an atomic, content-preserving
///   `compare_exchange(0, 0)`) only bytes at or above the region's claim frontier, reading that
///   frontier and touching under `lock`; claims advance the frontier under the same lock.
///
/// The memory outlives the thread: `finish` and `Drop` stop and join it first.
pub struct ReceiveMemory<'a> {
    /// The owned buffers, by region (`None` for borrowed regions). Never dereferenced while shared.
    owned: Vec<Option<Buffer>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    _borrowed: PhantomData<&'a mut [u8]>,
}

// SAFETY: the memory is plain bytes, and every cross-thread access follows the frontier discipline
// in the type's docs (atomics order the writes before the reads).
unsafe impl Sync for ReceiveMemory<'_> {}
// SAFETY: the owned buffers are Send; the borrowed regions are `&'a mut [u8]`, which is Send.
unsafe impl Send for ReceiveMemory<'_> {}

impl fmt::Debug for ReceiveMemory<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiveMemory")
            .field("regions", &self.shared.regions.len())
            .field("stats", &self.stats())
            .finish()
    }
}

impl<'a> ReceiveMemory<'a> {
    /// Takes `targets` (the receiver fills the fresh ones in this order) and starts prefaulting the
    /// fresh ones, with the default [`PrefaultOptions`].
    pub fn new(targets: Vec<Target<'a>>) -> ReceiveMemory<'a> {
        ReceiveMemory::with_options(targets, PrefaultOptions::default())
    }

    /// As [`new`](Self::new), with `options`.
    pub fn with_options(targets: Vec<Target<'a>>, options: PrefaultOptions) -> ReceiveMemory<'a> {
        let method = match options.method {
            Some(m) if m.is_supported() => m,
            _ => PrefaultMethod::best(),
        };
        let page = page_size();
        let mut start = 0u64;
        let mut owned = Vec::with_capacity(targets.len());
        let mut regions = Vec::with_capacity(targets.len());
        for target in targets {
            let carved_from = match &target {
                Target::Fresh(b) => b.carved_from(),
                _ => None,
            };
            let (ptr, len, mapped, prefault, span, buffer) = match target {
                Target::Fresh(mut b) | Target::Touched(mut b) if b.is_empty() => {
                    (b.as_mut_ptr(), 0, false, false, (0, 0), Some(b))
                }
                Target::Fresh(mut b) => (
                    b.as_mut_ptr(),
                    b.len(),
                    b.is_mapped(),
                    true,
                    b.page_span(),
                    Some(b),
                ),
                Target::Touched(mut b) => (
                    b.as_mut_ptr(),
                    b.len(),
                    b.is_mapped(),
                    false,
                    b.page_span(),
                    Some(b),
                ),
                Target::Borrowed(bytes) => {
                    (bytes.as_mut_ptr(), bytes.len(), false, false, (0, 0), None)
                }
            };
            regions.push(Region {
                base: NonNull::new(ptr).expect("slices and buffers are never null"),
                addr: ptr.addr(),
                len,
                span,
                carved_from,
                mapped,
                prefault,
                start,
                claimed: AtomicUsize::new(0),
                landed: AtomicUsize::new(0),
                writes: Mutex::default(),
            });
            if prefault {
                start += len as u64;
            }
            owned.push(buffer);
        }
        let shared = Arc::new(Shared {
            regions,
            total: start,
            method,
            step: options.step.max(1).next_multiple_of(page),
            mlock_step: mlock_step().max(page),
            stop: AtomicBool::new(false),
            done: AtomicBool::new(false),
            hint: AtomicU64::new(0),
            window: u64::try_from(options.window).unwrap_or(u64::MAX),
            waiting: AtomicBool::new(false),
            parked_hint: AtomicU64::new(0),
            progress: AtomicU64::new(0),
            prefaulted: AtomicU64::new(0),
            lock: Mutex::new(()),
            wanted: AtomicU64::new(u64::MAX),
            woken: Mutex::new(()),
            advanced: Condvar::new(),
        });
        let thread = if start == 0 {
            None
        } else {
            let s = Arc::clone(&shared);
            match std::thread::Builder::new()
                .name("pgt-prefault".into())
                .spawn(move || {
                    // Done however `run` ends (it is not meant to panic).
                    let _done = FinishOnDrop(&s);
                    run(&s)
                }) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(
                        "pgt: cannot start the prefault thread ({e}); receiving without"
                    );
                    None
                }
            }
        };
        ReceiveMemory {
            owned,
            shared,
            thread,
            _borrowed: PhantomData,
        }
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.shared.regions.len()
    }

    /// Whether there are no regions.
    pub fn is_empty(&self) -> bool {
        self.shared.regions.is_empty()
    }

    /// Length of region `index`.
    pub fn region_len(&self, index: usize) -> usize {
        self.shared.regions.get(index).map_or(0, |r| r.len)
    }

    /// The prefault method in use.
    pub fn method(&self) -> PrefaultMethod {
        self.shared.method
    }

    /// The prefaulter's progress so far.
    pub fn stats(&self) -> PrefaultStats {
        PrefaultStats {
            method: self.shared.method,
            // Acquire, and before `prefaulted`: the counts added before the progress read are
            // seen (`prefault_done` does not synchronise; Miri's weak memory showed a finished
            // prefaulter's final progress with a stale `prefaulted` of 0).
            progress: self.shared.progress.load(Ordering::Acquire),
            prefaulted: self.shared.prefaulted.load(Ordering::Relaxed),
            total: self.shared.total,
        }
    }

    /// Whether the prefaulter has gone through every fresh region (or was stopped, or never ran).
    pub fn prefault_done(&self) -> bool {
        self.thread.is_none() || self.shared.done.load(Ordering::Acquire)
    }

    /// Writes `parts` (each a region and a byte range of it): hands `f` one writable slice per part,
    /// in order, and once `f` has returned, marks them landed (readable by [`read`](Self::read)).
    /// The ranges of one region must come in increasing order across calls, never below an earlier
    /// write (the plan's segments do). Writes of one region may run on several threads at once; the
    /// region then lands when the last of them returns. On error nothing is handed out.
    pub fn write<R>(
        &self,
        parts: &[(usize, Range<usize>)],
        f: impl FnOnce(&mut [&mut [u8]]) -> R,
    ) -> Result<R, ClaimError> {
        let mut slices = self.claim_all(parts)?;
        let result = f(&mut slices);
        drop(slices);
        self.land(parts);
        Ok(result)
    }

    /// As [`write`](Self::write), for a fill that can fail or turn out not to be wanted: when `f`
    /// returns `Err`, nothing lands and the ranges are given back, so that the same ranges can be
    /// written again (a receive that took a stale message of another transfer, PROTOCOL.md §12). The
    /// bytes `f` wrote stay below the landed frontier, never read, until a later write lands its own.
    pub fn try_write<T, E>(
        &self,
        parts: &[(usize, Range<usize>)],
        f: impl FnOnce(&mut [&mut [u8]]) -> Result<T, E>,
    ) -> Result<Result<T, E>, ClaimError> {
        let mut slices = self.claim_all(parts)?;
        let result = f(&mut slices);
        drop(slices);
        match &result {
            Ok(_) => self.land(parts),
            // The slices are gone: the ranges can be handed out again.
            Err(_) => self.unclaim_all(parts),
        }
        Ok(result)
    }

    /// Claims every part, or none (giving back what it claimed).
    fn claim_all(&self, parts: &[(usize, Range<usize>)]) -> Result<Vec<&mut [u8]>, ClaimError> {
        let mut slices = Vec::with_capacity(parts.len());
        for (i, (region, range)) in parts.iter().enumerate() {
            match self.claim(*region, range.clone()) {
                Ok(s) => slices.push(s),
                Err(e) => {
                    // Give back what this call claimed: nothing was written, nothing lands.
                    drop(slices);
                    self.unclaim_all(&parts[..i]);
                    return Err(e);
                }
            }
        }
        Ok(slices)
    }

    /// Gives back claims of parts whose slices are gone, latest first (so that two parts of one
    /// region both go back).
    fn unclaim_all(&self, parts: &[(usize, Range<usize>)]) {
        for (r, range) in parts.iter().rev() {
            self.unclaim(*r, range.clone());
        }
    }

    /// Marks written parts landed.
    fn land(&self, parts: &[(usize, Range<usize>)]) {
        for (region, range) in parts {
            match self.shared.regions.get(*region) {
                Some(r) if !range.is_empty() => {
                    let mut w = r.writes();
                    w.in_flight -= 1;
                    w.end = w.end.max(range.end);
                    r.settle(&w);
                }
                _ => {}
            }
        }
    }

    /// Bytes `range` of region `index`, once they have landed (else `None`).
    pub fn read(&self, index: usize, range: Range<usize>) -> Option<&[u8]> {
        let region = self.shared.regions.get(index)?;
        if range.start > range.end || range.end > region.landed.load(Ordering::Acquire) {
            return None;
        }
        if range.is_empty() {
            return Some(&[]);
        }
        let ptr = region.base.as_ptr().cast_const();
        // SAFETY: `range` lies below `landed` (checked, Acquire), so it is within the region, it was
        // written by writes that have all returned, their slices gone (Release), or skipped, and no
        // writable slice will ever cover it again (claims start at or above `claimed` ≥ `landed`).
        // The region's memory lives as long as `self` (owned, unmoved; or borrowed for 'a).
        Some(unsafe { std::slice::from_raw_parts(ptr.add(range.start), range.len()) })
    }

    #[allow(clippy::mut_from_ref)] // Claims are disjoint by construction: see the type's docs.
    fn claim(&self, index: usize, range: Range<usize>) -> Result<&mut [u8], ClaimError> {
        let region = self.shared.regions.get(index).ok_or(ClaimError {
            region: index,
            range: range.clone(),
            len: 0,
        })?;
        let error = || ClaimError {
            region: index,
            range: range.clone(),
            len: region.len,
        };
        if range.start > range.end || range.end > region.len {
            return Err(error());
        }
        if range.is_empty() {
            return Ok(&mut []);
        }
        {
            let _touch = self.touch_lock(region);
            let mut w = region.writes();
            if range.start < region.claimed.load(Ordering::Relaxed) {
                return Err(error());
            }
            region.claimed.store(range.end, Ordering::Release);
            w.in_flight += 1;
        }
        if region.prefault {
            let sh = &self.shared;
            let hint = region.start + range.start as u64;
            sh.hint.fetch_max(hint, Ordering::SeqCst);
            // The prefaulter may be waiting for the receiver to come closer: once it has come a
            // step closer, it goes on.
            if sh.waiting.load(Ordering::SeqCst)
                && hint >= (sh.parked_hint.load(Ordering::SeqCst)).saturating_add(sh.step as u64)
            {
                self.wake_prefaulter();
            }
            self.wait_for_prefaulter(region, &range);
        }
        let ptr = region.base.as_ptr();
        // SAFETY: `range` is within the region, whose memory lives (unmoved) as long as `self`. The
        // frontier update above succeeded only if `range` lies at or above every earlier claim of
        // this region, so no other slice handed out covers these bytes, and no reader sees them
        // before this claim, counted in flight, has returned and its slice is gone (`settle`). The
        // background thread no longer touches them (see the type's docs).
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr.add(range.start), range.len()) })
    }

    /// Waits until the prefaulter has mapped the claimed range (or as much of it as its window
    /// allows), so that the write never faults pages itself. A receiver that writes faster than
    /// pages fault (MPI's single-copy receive: ~5.6 GB/s here, against ~3.3 GB/s of
    /// `MADV_POPULATE_WRITE`) otherwise caught up with the prefaulter and both faulted the same
    /// pages at once, each fault slower than either alone (`mpi_bench … fresh`: 0.63 s for 1 GiB,
    /// TCP 0.40 s; `docs/perf.md`). Only for the kernel methods: with `Touch` the prefaulter skips
    /// what is claimed anyway.
    fn wait_for_prefaulter(&self, region: &Region, range: &Range<usize>) {
        if self.thread.is_none() || self.shared.method == PrefaultMethod::Touch {
            return;
        }
        let sh = &self.shared;
        let hint = sh.hint.load(Ordering::SeqCst);
        let want = (region.start + range.end as u64).min(hint.saturating_add(sh.window));
        let ready = || sh.progress.load(Ordering::SeqCst) >= want || sh.done.load(Ordering::SeqCst);
        if ready() {
            return;
        }
        // Block until the prefaulter's `advance` passes `want`, rather than poll: polling with
        // yields and 20 µs sleeps cost the receiving thread a context switch per round, up to a
        // quarter of its CPU on `small` (10,000 claims; docs/perf.md, issue 11 item 2).
        let mut woken = sh.woken.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            // Under `woken`, so that `advance` cannot reset it between this and the wait.
            sh.wanted.fetch_min(want, Ordering::SeqCst);
            if ready() {
                break;
            }
            // It may be waiting for the receiver to come a step closer: this claim needs it now.
            // (Or it sees `wanted` before it parks.)
            if sh.waiting.load(Ordering::SeqCst) {
                self.wake_prefaulter();
            }
            // The timeout only bounds a wake-up lost to a bug: `advance` and `finish` notify.
            woken = sh
                .advanced
                .wait_timeout(woken, std::time::Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn wake_prefaulter(&self) {
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    /// Undoes a claim of `write` whose slice is gone or was never handed out (the frontier goes back
    /// if nobody claimed past it since). Sound: no slice covers the range any more, and the bytes are
    /// above `landed`, so no reader sees them (unless later writes land past them: then they are a
    /// gap, written, if at all, by a write that has returned); the prefaulter may touch them again
    /// (content-preserving, under the same lock).
    fn unclaim(&self, index: usize, range: Range<usize>) {
        let Some(r) = self.shared.regions.get(index) else {
            return;
        };
        if range.is_empty() {
            return;
        }
        let _touch = self.touch_lock(r);
        let mut w = r.writes();
        if r.claimed.load(Ordering::Relaxed) == range.end {
            r.claimed.store(range.start, Ordering::Release);
        }
        w.in_flight -= 1;
        // Writes of the region that returned meanwhile may land now.
        r.settle(&w);
    }

    /// In `Touch` mode, the lock under which a fresh region's claim frontier moves.
    fn touch_lock(&self, region: &Region) -> Option<MutexGuard<'_, ()>> {
        (self.shared.method == PrefaultMethod::Touch && region.prefault).then(|| self.shared.lock())
    }

    /// Stops the prefaulter and gives the owned buffers back, by region (`None` for borrowed ones).
    pub fn finish(mut self) -> Vec<Option<Buffer>> {
        self.stop();
        std::mem::take(&mut self.owned)
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            // The thread never panics (no indexing out of bounds, no unwraps on fallible calls);
            // if it somehow did, the buffers are still intact and ours.
            let _ = t.join();
        }
    }
}

impl Drop for ReceiveMemory<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Marks the prefaulter done ([`Shared::finish`]) when dropped.
struct FinishOnDrop<'a>(&'a Shared);

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// `Touch` mode touches this many pages per lock.
const TOUCH_BATCH: usize = 64;

/// How long the prefaulter waits for the receiver before looking again (a claim wakes it sooner).
const WINDOW_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// The background thread: walks all regions in order, one step at a time, at most `window` bytes
/// ahead of the receiver.
fn run(sh: &Shared) {
    let page = page_size();
    let mut pos = 0u64; // in receive order
    let mut r = 0usize; // region containing `pos`
    while pos < sh.total && !sh.stop.load(Ordering::Relaxed) {
        // The receiver started writing at `hint`, ahead of us. With the kernel methods it waits for
        // us from there on (`wait_for_prefaulter`): resume there. With `Touch` it does not: resume
        // one step past it rather than fault the pages it is faulting right now.
        let hint = sh.hint.load(Ordering::SeqCst);
        if hint > 0 && hint >= pos {
            let ahead = if sh.method == PrefaultMethod::Touch {
                sh.step as u64
            } else {
                0
            };
            pos = (hint + ahead).min(sh.total);
        }
        // Never more than `window` ahead of the receiver: wait for it there.
        let limit = hint.saturating_add(sh.window);
        if pos >= limit {
            sh.advance(pos);
            sh.parked_hint.store(hint, Ordering::SeqCst);
            sh.waiting.store(true, Ordering::SeqCst);
            // A claim that moved the hint a step since it was read, or that waits for more than
            // `pos` (`advance` just cleared what it reached), either is seen here or sees
            // `waiting` and unparks us (which makes the park return at once).
            let moved = sh.hint.load(Ordering::SeqCst) >= hint.saturating_add(sh.step as u64)
                || sh.wanted.load(Ordering::SeqCst) != u64::MAX;
            if !moved && !sh.stop.load(Ordering::Relaxed) {
                std::thread::park_timeout(WINDOW_WAIT);
            }
            sh.waiting.store(false, Ordering::SeqCst);
            continue;
        }
        while r < sh.regions.len()
            && (!sh.regions[r].prefault || sh.regions[r].start + sh.regions[r].len as u64 <= pos)
        {
            r += 1;
        }
        let Some(region) = sh.regions.get(r) else {
            break;
        };
        let off = (pos - region.start) as usize;
        // Steps end on `step` boundaries of the address space (huge-page aligned for the default),
        // and at the window's end.
        let end_addr = (region.addr + off + 1).next_multiple_of(sh.step);
        let to_limit = usize::try_from(limit - region.start).unwrap_or(usize::MAX);
        let end = (end_addr - region.addr).min(region.len).min(to_limit);
        match sh.method {
            PrefaultMethod::PopulateWrite => {
                // Storages carved from one mapping lie back to back: one call for all of them
                // the step reaches (else one per storage, 10,000 for `small`).
                let (last, last_end) = step_through(sh, r, end, end_addr, limit);
                let last_region = &sh.regions[last];
                if populate(region, off, last_region, last_end) {
                    let to = last_region.start + last_end as u64;
                    sh.prefaulted.fetch_add(to - pos, Ordering::Relaxed);
                    pos = to;
                } else {
                    // Not faultable (out of memory, ...): leave this buffer to the receiver.
                    pos = region.start + region.len as u64;
                }
            }
            PrefaultMethod::Mlock => {
                if region.mapped && lock_unlock(region, off, end, sh.mlock_step) {
                    sh.prefaulted
                        .fetch_add((end - off) as u64, Ordering::Relaxed);
                    pos = region.start + end as u64;
                } else {
                    pos = region.start + region.len as u64;
                }
            }
            PrefaultMethod::Touch => {
                let mut i = off;
                while i < end && !sh.stop.load(Ordering::Relaxed) {
                    // A batch of pages per lock, so that a claim waits for at most one batch.
                    let _guard = sh.lock();
                    let from = i.max(region.claimed.load(Ordering::Acquire));
                    if from >= end {
                        i = from;
                        break;
                    }
                    let batch_end = end.min(from + TOUCH_BATCH * page);
                    i = from;
                    while i < batch_end {
                        // SAFETY: `i < len`, so `p` is in the buffer, which outlives this thread.
                        let p = unsafe { region.base.as_ptr().add(i) };
                        // SAFETY: as above, `p` is in the buffer, which outlives this thread.
                        // `i ≥ claimed`, read under the lock `claim` takes to advance it, so no
                        // slice covering this byte has been handed out, and none can be until
                        // we release the lock: nobody else accesses the byte meanwhile. The
                        // exchange stores 0 only where 0 already is: contents never change.
                        let byte = unsafe { AtomicU8::from_ptr(p) };
                        let _ = byte.compare_exchange(0, 0, Ordering::Relaxed, Ordering::Relaxed);
                        i = (region.addr + i + 1).next_multiple_of(page) - region.addr;
                    }
                    sh.prefaulted
                        .fetch_add((batch_end - from) as u64, Ordering::Relaxed);
                    i = i.max(batch_end);
                }
                pos = region.start + i.min(region.len) as u64;
            }
        }
        sh.advance(pos);
    }
    sh.advance(sh.total);
}

/// Where a `PopulateWrite` step that starts in region `r` and reaches offset `end` of it (the
/// step's address boundary `end_addr`, or the window's `limit`) ends: while it covers a region to
/// its end and the next region is the next piece of the same carved mapping (at most the
/// alignment padding apart), it goes on into that one. Returns the last region and the offset in
/// it.
fn step_through(sh: &Shared, r: usize, end: usize, end_addr: usize, limit: u64) -> (usize, usize) {
    let (mut last, mut last_end) = (r, end);
    while let (Some(cur), Some(next)) = (sh.regions.get(last), sh.regions.get(last + 1)) {
        let adjacent = cur.carved_from.is_some()
            && next.carved_from == cur.carved_from
            && next.prefault
            && next.addr >= cur.addr + cur.len
            && next.addr - (cur.addr + cur.len) < MIN_ALIGN;
        if last_end < cur.len || !adjacent || next.addr >= end_addr || next.start >= limit {
            break;
        }
        let to_limit = usize::try_from(limit - next.start).unwrap_or(usize::MAX);
        last += 1;
        last_end = (end_addr - next.addr).min(next.len).min(to_limit);
    }
    (last, last_end)
}

/// `MADV_POPULATE_WRITE` over the pages spanning byte `off` of `first` up to byte `end` of `last`
/// (the same region, or a later one carved from the same mapping: see [`step_through`]), rounded
/// out to pages: the partial pages at the ends, and the padding between carved regions, belong to
/// the same writable mapping.
#[cfg(target_os = "linux")]
fn populate(first: &Region, off: usize, last: &Region, end: usize) -> bool {
    let page = page_size();
    let lo = ((first.addr + off) / page * page).max(first.span.0);
    let hi = (last.addr + end)
        .next_multiple_of(page)
        .min(last.span.0 + last.span.1);
    if hi <= lo {
        return true;
    }
    for _ in 0..8 {
        // SAFETY: `lo..hi` lies within pages of one live, writable allocation: one region's,
        // or (with the padding between them) consecutive regions' of one carved mapping.
        // POPULATE_WRITE performs no access visible to the program: it maps the pages writable
        // (allocating zeroed ones where none were) and never changes their contents.
        let r = unsafe {
            libc::madvise(
                ptr::without_provenance_mut(lo),
                hi - lo,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r == 0 {
            return true;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
            _ => return false,
        }
    }
    false
}

#[cfg(not(target_os = "linux"))]
fn populate(_first: &Region, _off: usize, _last: &Region, _end: usize) -> bool {
    false
}

/// `mlock` then `munlock` the pages spanning bytes `off..end` of `region` (a mapped buffer), in
/// pieces of at most `piece` bytes.
fn lock_unlock(region: &Region, off: usize, end: usize, piece: usize) -> bool {
    let page = page_size();
    let (span_lo, span_len) = region.span;
    let mut lo = ((region.addr + off) / page * page).max(span_lo);
    let hi = (region.addr + end)
        .next_multiple_of(page)
        .min(span_lo + span_len);
    while lo < hi {
        let len = (hi - lo).min(piece);
        let p = ptr::without_provenance::<libc::c_void>(lo);
        // SAFETY: `lo..lo + len` lies in the buffer's own live, writable, private mapping.
        // mlock faults its pages in (writable: the mapping is private and writable) without
        // changing contents; munlock only clears the lock again. No memory access by us.
        let ok = unsafe {
            let ok = libc::mlock(p, len) == 0;
            libc::munlock(p, len);
            ok
        };
        if !ok {
            return false;
        }
        lo += len;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Pool
// ---------------------------------------------------------------------------------------------

/// A bounded pool of buffers kept between transfers, keyed by exact length: a receiver that gets
/// checkpoints of the same shapes again reuses touched memory (memset speed) instead of faulting
/// fresh pages. Holds at most `max_bytes` bytes of buffers.
#[derive(Debug)]
pub struct BufferPool {
    max_bytes: usize,
    inner: Mutex<PoolInner>,
}

#[derive(Debug, Default)]
struct PoolInner {
    bytes: usize,
    free: HashMap<usize, Vec<Buffer>>,
}

impl BufferPool {
    /// An empty pool that will hold at most `max_bytes` bytes.
    pub fn new(max_bytes: usize) -> BufferPool {
        BufferPool {
            max_bytes,
            inner: Mutex::new(PoolInner::default()),
        }
    }

    fn inner(&self) -> MutexGuard<'_, PoolInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `buf` for reuse if it fits under the bound; returns whether it was kept (if not, it
    /// is dropped). Zero-length buffers are never kept.
    pub fn put(&self, buf: Buffer) -> bool {
        let mut inner = self.inner();
        if buf.is_empty() || inner.bytes + buf.len() > self.max_bytes {
            return false;
        }
        inner.bytes += buf.len();
        inner.free.entry(buf.len()).or_default().push(buf);
        true
    }

    /// Keeps as many of `buffers` as fit (e.g. [`crate::state_dict::StateDict::into_buffers`] of a
    /// checkpoint you are done with); returns the bytes kept. The rest are dropped.
    ///
    /// The bound counts buffers' own lengths: a kept buffer carved by [`Buffer::zeroed_many`] (a
    /// received checkpoint's small storages) also keeps the pages it shares with dropped siblings,
    /// so recycle a checkpoint whole or not at all.
    pub fn recycle(&self, buffers: impl IntoIterator<Item = Buffer>) -> usize {
        buffers
            .into_iter()
            .map(|b| {
                let len = b.len();
                if self.put(b) {
                    len
                } else {
                    0
                }
            })
            .sum()
    }

    /// A kept buffer of exactly `len` bytes, if any. Its contents are what its last user left:
    /// overwrite all of it (a receiver does).
    pub fn take(&self, len: usize) -> Option<Buffer> {
        let mut inner = self.inner();
        let list = inner.free.get_mut(&len)?;
        let buf = list.pop()?;
        if list.is_empty() {
            inner.free.remove(&len);
        }
        inner.bytes -= len;
        Some(buf)
    }

    /// A kept buffer of `len` bytes, or else a fresh zeroed one; the flag says whether it was
    /// reused (contents stale, pages touched) rather than fresh (zeroed, untouched).
    pub fn take_or_zeroed(&self, len: usize) -> (Buffer, bool) {
        match self.take(len) {
            Some(b) => (b, true),
            None => (Buffer::zeroed(len), false),
        }
    }

    /// Bytes currently kept.
    pub fn bytes(&self) -> usize {
        self.inner().bytes
    }

    /// Drops every kept buffer.
    pub fn clear(&self) {
        let mut inner = self.inner();
        inner.free.clear();
        inner.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Under Miri (`scripts/miri.sh`, `docs/miri.md`) the tests take smaller sizes where they say so,
    /// and skip what only the kernel can answer (`resident`, huge-page alignment). Everywhere they
    /// fill and compare bytes in bulk (`Pattern`, `all_eq`): per-byte accesses to a large
    /// allocation cost Miri time quadratic in its length.
    const MIRI: bool = cfg!(miri);

    /// Fraction of the buffer's pages resident (mincore). Not under Miri (no `mincore`).
    fn resident(buf: &Buffer) -> f64 {
        let (lo, len) = buf.page_span();
        let pages = len / page_size();
        let mut vec = vec![0u8; pages];
        // SAFETY: `lo..lo+len` is page-aligned and mapped (the buffer's own pages); `vec` has one
        // byte per page.
        let r = unsafe { libc::mincore(ptr::without_provenance_mut(lo), len, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|&&v| v & 1 == 1).count() as f64 / pages as f64
    }

    /// Resident bytes of the buffer's pages (mincore). Not under Miri.
    fn resident_bytes(buf: &Buffer) -> usize {
        let (_, len) = buf.page_span();
        (resident(buf) * len as f64).round() as usize
    }

    /// Whether every byte of `bytes` is `x` (compared a page at a time).
    fn all_eq(bytes: &[u8], x: u8) -> bool {
        let page = [x; 4096];
        bytes.chunks(page.len()).all(|c| c == &page[..c.len()])
    }

    /// A never-zero byte pattern by position (so that a stray zero write, or bytes written at the
    /// wrong offset, show), written and checked a period at a time.
    struct Pattern {
        /// Two periods, so that any period-long window starts inside it.
        table: Vec<u8>,
    }

    impl Pattern {
        /// Prime, and no divisor of any page, alignment or claim size.
        const PERIOD: usize = 4093;

        /// The pattern of `seed`, built once per process (byte by byte: slow under Miri).
        fn new(seed: u8) -> &'static Pattern {
            static BUILT: [OnceLock<Pattern>; 256] = [const { OnceLock::new() }; 256];
            BUILT[usize::from(seed)].get_or_init(|| {
                let mut table: Vec<u8> = (0..Pattern::PERIOD as u32)
                    .map(|i| {
                        let j = i ^ (u32::from(seed) << 16);
                        (j.wrapping_mul(0x9E37_79B1) >> 24) as u8 % 251 + 1
                    })
                    .collect();
                table.extend_from_within(..);
                Pattern { table }
            })
        }

        /// The pattern's bytes `off..off + dst.len()`, into `dst`.
        fn fill(&self, dst: &mut [u8], off: usize) {
            let s = off % Pattern::PERIOD;
            for c in dst.chunks_mut(Pattern::PERIOD) {
                c.copy_from_slice(&self.table[s..s + c.len()]);
            }
        }

        /// Whether `src` holds the pattern's bytes `off..off + src.len()`.
        fn matches(&self, src: &[u8], off: usize) -> bool {
            let s = off % Pattern::PERIOD;
            src.chunks(Pattern::PERIOD)
                .all(|c| c == &self.table[s..s + c.len()])
        }

        /// The pattern's bytes `0..len`.
        fn vec(&self, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.fill(&mut v, 0);
            v
        }
    }

    /// The first index where `a` and `b` differ, for a failure message.
    fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
        if a == b {
            return None;
        }
        Some(
            (0..a.len().min(b.len()))
                .find(|&i| a[i] != b[i])
                .unwrap_or(a.len().min(b.len())),
        )
    }

    const ALL_METHODS: [PrefaultMethod; 3] = [
        PrefaultMethod::PopulateWrite,
        PrefaultMethod::Mlock,
        PrefaultMethod::Touch,
    ];

    fn supported_methods() -> Vec<PrefaultMethod> {
        let methods: Vec<PrefaultMethod> = ALL_METHODS
            .into_iter()
            .filter(|m| m.is_supported())
            .collect();
        if MIRI {
            // Miri runs no `madvise`, `getrlimit` or `mlock`.
            assert_eq!(methods, [PrefaultMethod::Touch]);
            assert_eq!(PrefaultMethod::best(), PrefaultMethod::Touch);
        }
        methods
    }

    fn wait_done(pf: &ReceiveMemory<'_>) {
        let t = Instant::now();
        while !pf.prefault_done() {
            assert!(t.elapsed() < Duration::from_secs(60), "prefaulter stuck");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn carved_buffers_are_aligned_disjoint_untouched_and_outlive_each_other() {
        let lens = [0usize, 1, 63, 64, 4096, 70_000, 0, 5, 3 * 4096 + 1];
        let mut bufs = Buffer::zeroed_many(&lens).unwrap();
        assert_eq!(bufs.iter().map(|b| b.len()).collect::<Vec<_>>(), lens);
        let big = &bufs[5];
        assert!(big.is_mapped());
        if !MIRI {
            assert_eq!(resident(big), 0.0, "allocating touched no page");
        }
        let patterns: Vec<&Pattern> = (0..lens.len()).map(|k| Pattern::new(k as u8)).collect();
        for (k, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.as_mut_ptr().addr() % MIN_ALIGN, 0, "buffer {k} aligned");
            assert!(all_eq(b, 0), "buffer {k} zeroed");
            patterns[k].fill(b, 0);
        }
        // Every buffer kept its own bytes (no overlap), also after others are dropped (dropping one
        // returns its inner pages; the mapping lives on for the rest).
        let kept: Vec<Buffer> = bufs
            .into_iter()
            .enumerate()
            .filter_map(|(k, b)| (k % 2 == 0).then_some((k, b)))
            .map(|(k, b)| {
                assert!(patterns[k].matches(&b, 0));
                b
            })
            .collect();
        for (j, b) in kept.iter().enumerate() {
            let k = 2 * j;
            assert!(
                patterns[k].matches(b, 0),
                "buffer {k} after its neighbours were dropped"
            );
        }
        assert!(Buffer::zeroed_many(&[]).unwrap().is_empty());
        assert!(Buffer::zeroed_many(&[usize::MAX, 2]).is_err());
    }

    /// Carved buffers written, read and dropped on different threads, in any order: each thread
    /// owns its buffer's bytes (the drop hands whole pages back), the last drop unmaps.
    #[test]
    fn carved_buffers_live_and_die_on_several_threads() {
        let lens = [4096 + 100, 3, 2 * 4096, 0, 5000, 64];
        for round in 0..2u8 {
            let bufs = Buffer::zeroed_many(&lens).unwrap();
            let kept = std::thread::scope(|s| {
                let handles: Vec<_> = bufs
                    .into_iter()
                    .enumerate()
                    .map(|(k, mut b)| {
                        s.spawn(move || {
                            let p = Pattern::new(k as u8 + round);
                            p.fill(&mut b, 0);
                            assert!(p.matches(&b, 0), "buffer {k}");
                            // Half of them die here, on their thread; the others go back.
                            ((k + round as usize) % 2 == 0).then_some((k, b))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            });
            for (k, b) in &kept {
                assert!(Pattern::new(*k as u8 + round).matches(b, 0), "buffer {k}");
            }
            // Clones are deep copies that outlive the mapping.
            let clones: Vec<(usize, Buffer)> = kept.iter().map(|(k, b)| (*k, b.clone())).collect();
            drop(kept);
            for (k, b) in &clones {
                assert!(!b.is_mapped() || b.len() >= MMAP_THRESHOLD);
                assert!(Pattern::new(*k as u8 + round).matches(b, 0), "clone of {k}");
            }
        }
    }

    const SIZES: &[usize] = &[
        1,
        7,
        63,
        64,
        100,
        4095,
        4096,
        65_537,
        MMAP_THRESHOLD - 1,
        MMAP_THRESHOLD,
        HUGE_PAGE - 1,
        HUGE_PAGE,
        3 * HUGE_PAGE + 12_345,
    ];

    #[test]
    fn alignment_and_zeroed() {
        for &len in SIZES {
            for pages in [Pages::Auto, Pages::Small, Pages::Huge] {
                let b = Buffer::zeroed_with(len, pages);
                assert_eq!(b.len(), len);
                let a = b.as_ptr().addr();
                assert_eq!(a % MIN_ALIGN, 0, "{len} {pages:?}");
                if len >= MMAP_THRESHOLD {
                    assert!(b.is_mapped());
                    assert_eq!(a % page_size(), 0, "{len} {pages:?}");
                }
                // Miri's mappings are page aligned only (see `map_anon`).
                if pages != Pages::Small && len >= HUGE_PAGE && !MIRI {
                    assert_eq!(a % HUGE_PAGE, 0, "{len} {pages:?}");
                }
                assert_eq!(b.is_huge(), pages == Pages::Huge && b.is_mapped());
                assert!(all_eq(&b, 0), "{len} {pages:?} not zeroed");
            }
        }
        assert!(Buffer::zeroed_with(HUGE_PAGE, Pages::Huge).is_huge());
        assert!(!Buffer::zeroed(HUGE_PAGE).is_huge());
        assert!(!Buffer::zeroed_with(HUGE_PAGE, Pages::Small).is_huge());
        assert!(!Buffer::zeroed(MMAP_THRESHOLD - 1).is_mapped());
    }

    #[test]
    fn zero_length() {
        let mut b = Buffer::zeroed(0);
        assert!(b.is_empty());
        assert_eq!(b.as_ptr().addr() % MIN_ALIGN, 0);
        assert_eq!(&b[..], &[] as &[u8]);
        assert_eq!(&mut b[..], &mut [] as &mut [u8]);
        assert!(Buffer::from_vec(Vec::new()).is_empty());
        let pf = ReceiveMemory::new(vec![
            Target::Fresh(Buffer::zeroed(0)),
            Target::Fresh(Buffer::zeroed(0)),
        ]);
        assert_eq!(pf.write(&[(1, 0..0)], |p| p[0].len()), Ok(0));
        assert_eq!(pf.read(1, 0..0), Some(&[][..]));
        assert_eq!(pf.stats().total, 0);
        let back = pf.finish();
        assert_eq!(back.len(), 2);
        drop(ReceiveMemory::new(Vec::new()));
    }

    #[test]
    fn from_vec_and_slice() {
        let p = Pattern::new(0);
        let v = p.vec(5000);
        assert_eq!(&Buffer::from_slice(&v)[..], &v[..]);
        assert_eq!(&Buffer::from_vec(v.clone())[..], &v[..]);
        let big = p.vec(MMAP_THRESHOLD + 3);
        let b = Buffer::from_vec(big.clone());
        assert!(b.is_mapped());
        assert_eq!(&b[..], &big[..]);
    }

    #[test]
    fn clone_is_deep() {
        for len in [0, 100, HUGE_PAGE + 3] {
            for pages in [Pages::Auto, Pages::Huge] {
                let mut a = Buffer::zeroed_with(len, pages);
                Pattern::new(2).fill(&mut a, 0);
                let b = a.clone();
                assert_eq!((b.len(), b.is_huge()), (a.len(), a.is_huge()));
                assert_eq!(&a[..], &b[..]);
                if len > 0 {
                    assert_ne!(a.as_ptr(), b.as_ptr());
                    a[0] ^= 0xff;
                    assert_ne!(a[0], b[0]);
                }
                // The clone lives on another thread, the original dies here.
                let expect = b.to_vec();
                let b = std::thread::spawn(move || b).join().unwrap();
                drop(a);
                assert_eq!(&b[..], &expect[..]);
            }
        }
    }

    #[test]
    fn large_write_read_back() {
        let len = if MIRI {
            HUGE_PAGE + 123
        } else {
            (64 << 20) + 123
        };
        for pages in [Pages::Small, Pages::Huge] {
            let p = Pattern::new(1);
            let mut b = Buffer::zeroed_with(len, pages);
            p.fill(&mut b, 0);
            assert!(p.matches(&b, 0));
            // Moving the buffer moves no bytes.
            let moved = std::thread::spawn(move || b).join().unwrap();
            assert!(p.matches(&moved, 0));
        }
    }

    #[test]
    fn prefaulter_maps_everything() {
        let sizes = if MIRI {
            [(2 << 20) + 5, MMAP_THRESHOLD]
        } else {
            [8 << 20, 3 << 20]
        };
        for method in supported_methods() {
            for pages in [Pages::Small, Pages::Huge] {
                let bufs: Vec<Buffer> = sizes
                    .iter()
                    .map(|&n| Buffer::zeroed_with(n, pages))
                    .collect();
                if !MIRI {
                    assert!(bufs.iter().all(|b| resident(b) < 0.5));
                }
                let opts = PrefaultOptions {
                    method: Some(method),
                    ..Default::default()
                };
                let pf = ReceiveMemory::with_options(
                    bufs.into_iter().map(Target::Fresh).collect(),
                    opts,
                );
                assert_eq!(pf.method(), method);
                wait_done(&pf);
                let st = pf.stats();
                assert_eq!((st.progress, st.prefaulted), (st.total, st.total));
                let bufs = pf.finish();
                for b in bufs.iter().flatten() {
                    if !MIRI {
                        assert_eq!(resident(b), 1.0, "{method:?} {pages:?}");
                    }
                    assert!(all_eq(b, 0));
                }
            }
        }
    }

    /// Storages carved from one mapping are prefaulted by steps that run on through the next ones
    /// (one `madvise` for all a step reaches) and stop at a buffer of another mapping: every one is
    /// mapped in full and counted once, and writes that follow the prefaulter through a window
    /// smaller than a step land intact.
    #[test]
    fn carved_neighbours_are_prefaulted_together() {
        let lens: Vec<usize> = (0..if MIRI { 12 } else { 600 })
            .map(|i| 1000 + (i * 4099) % 20_000)
            .collect();
        let own = if MIRI { 5000 } else { 3 << 20 };
        let total = (lens.iter().sum::<usize>() + own) as u64;
        let targets = || {
            let mut t: Vec<Target<'static>> = Buffer::zeroed_many(&lens)
                .unwrap()
                .into_iter()
                .map(Target::Fresh)
                .collect();
            t.insert(lens.len() / 2, Target::Fresh(Buffer::zeroed(own)));
            t
        };
        for method in supported_methods() {
            let opts = PrefaultOptions {
                method: Some(method),
                ..Default::default()
            };
            let pf = ReceiveMemory::with_options(targets(), opts);
            wait_done(&pf);
            let st = pf.stats();
            assert_eq!(
                (st.progress, st.prefaulted, st.total),
                (total, total, total)
            );
            for b in pf.finish().iter().flatten() {
                if !MIRI {
                    assert_eq!(resident(b), 1.0, "{method:?}");
                }
                assert!(all_eq(b, 0));
            }

            // Writes region by region through a 16 KiB window: the claims wait for the
            // prefaulter, which waits for them.
            let opts = PrefaultOptions {
                window: 16 << 10,
                ..opts
            };
            let pf = ReceiveMemory::with_options(targets(), opts);
            let pattern = Pattern::new(7);
            for r in 0..pf.len() {
                let len = pf.region_len(r);
                pf.write(&[(r, 0..len)], |s| pattern.fill(s[0], r)).unwrap();
            }
            for (r, b) in pf.finish().iter().enumerate() {
                let b = b.as_ref().unwrap();
                assert!(pattern.matches(b, r), "{method:?}: region {r}");
            }
        }
    }

    /// Issue 10 #3: memory follows the data. 1 GiB of fresh memory that nobody writes costs one
    /// window of faulted pages; as the receiver writes, the prefaulter follows, a window ahead.
    #[test]
    fn the_prefaulter_stays_within_its_window_of_the_receiver() {
        const MIB: usize = 1 << 20;
        assert_eq!(PrefaultOptions::default().window, 32 * MIB);
        // Sizes in units: a MiB (under Miri 64 KiB, and residency is not checked there).
        let unit = if MIRI { 64 << 10 } else { MIB };
        let window = 16 * unit;
        let wait_for = |pf: &ReceiveMemory<'_>, progress: u64| {
            let t = Instant::now();
            while pf.stats().progress < progress {
                assert!(t.elapsed() < Duration::from_secs(60), "{:?}", pf.stats());
                std::thread::sleep(Duration::from_millis(1));
            }
            // It stays there.
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(pf.stats().progress, progress);
        };
        for method in supported_methods() {
            let bufs: Vec<Target<'_>> = (0..4)
                .map(|_| Target::Fresh(Buffer::zeroed(256 * unit)))
                .collect();
            let opts = PrefaultOptions {
                method: Some(method),
                // The default, a huge page, natively.
                step: 2 * unit,
                window,
            };
            let pf = ReceiveMemory::with_options(bufs, opts);
            assert_eq!(pf.stats().total, 1024 * unit as u64);
            // Nobody writes: the prefaulter faults the first window and waits.
            wait_for(&pf, window as u64);
            assert!(pf.stats().prefaulted <= window as u64, "{method:?}");
            assert!(!pf.prefault_done());
            // The receiver writes 64 units in claims of 4: the prefaulter follows, to a window past
            // the last claim's start.
            for c in 0..16 {
                pf.write(&[(0, c * 4 * unit..(c + 1) * 4 * unit)], |p| p[0].fill(1))
                    .unwrap();
            }
            let hint = 60 * unit;
            wait_for(&pf, (hint + window) as u64);
            let bufs = pf.finish();
            if !MIRI {
                let resident: usize = bufs.iter().flatten().map(resident_bytes).sum();
                assert!(
                    resident >= hint + window - 2 * MIB && resident <= hint + window + 2 * MIB,
                    "{method:?}: {} MiB resident",
                    resident / MIB
                );
            }
            assert!(all_eq(&bufs[0].as_ref().unwrap()[..64 * unit], 1));
        }
    }

    /// The receiver writes a never-zero pattern in odd-sized claims (not page aligned, sometimes
    /// skipping ahead) while the prefaulter runs over the same buffers with small steps; every
    /// byte must end up as written, and every unclaimed byte as it was.
    #[test]
    fn prefaulter_never_changes_data() {
        let sizes = if MIRI {
            // A mapped buffer, heap ones, a page: the Touch prefaulter over all of them.
            [MMAP_THRESHOLD + 12_345, 5, 0, 70_001, 40_000 + 4095, 4096]
        } else {
            [24 << 20, 5, 0, (1 << 20) + 7, (6 << 20) + 4095, 4096]
        };
        let (rounds, step) = if MIRI { (2, 16 << 10) } else { (4, 64 << 10) };
        let old = Pattern::new(3);
        for method in supported_methods() {
            for round in 0..rounds {
                let new = Pattern::new(round);
                let mut bufs: Vec<Buffer> = sizes
                    .iter()
                    .map(|&n| {
                        let pages = if round % 2 == 0 {
                            Pages::Huge
                        } else {
                            Pages::Small
                        };
                        Buffer::zeroed_with(n, pages)
                    })
                    .collect();
                // Some pre-existing content the prefaulter must preserve too.
                old.fill(&mut bufs[4][..10_000], 0);
                let opts = PrefaultOptions {
                    method: Some(method),
                    step,
                    ..Default::default()
                };
                let pf = ReceiveMemory::with_options(
                    bufs.into_iter().map(Target::Fresh).collect(),
                    opts,
                );
                let mut written: Vec<Vec<Range<usize>>> = vec![Vec::new(); sizes.len()];
                let mut claim_len = 4096 * 3 + 17 + round as usize * 1000;
                for (b, &n) in sizes.iter().enumerate() {
                    let mut off = if b == 4 { 10_000 } else { 0 };
                    while off < n {
                        // Every 7th claim skips ahead a little: leaves a gap nobody writes.
                        if (off / claim_len) % 7 == 3 {
                            off = (off + 5000).min(n);
                        }
                        let end = (off + claim_len).min(n);
                        pf.write(&[(b, off..end)], |s| new.fill(s[0], off)).unwrap();
                        // What landed reads back as written.
                        assert!(new.matches(pf.read(b, off..end).unwrap(), off));
                        written[b].push(off..end);
                        off = end;
                        claim_len = claim_len * 5 / 4 % (1 << 20) + 100;
                    }
                }
                let bufs = pf.finish();
                for (b, buf) in bufs.iter().enumerate() {
                    let buf = buf.as_ref().unwrap();
                    assert_eq!(buf.len(), sizes[b]);
                    let mut expect = vec![0u8; sizes[b]];
                    if b == 4 {
                        old.fill(&mut expect[..10_000], 0);
                    }
                    for r in &written[b] {
                        new.fill(&mut expect[r.clone()], r.start);
                    }
                    if let Some(i) = first_difference(buf, &expect) {
                        panic!(
                            "{method:?} round {round}: buffer {b} byte {i} is {} not {}",
                            buf[i], expect[i]
                        );
                    }
                }
            }
        }
    }

    /// Touched and borrowed regions are not prefaulted, but written and read the same way; the
    /// prefaulter skips them in receive order.
    #[test]
    fn touched_and_borrowed_regions() {
        let big = if MIRI { MMAP_THRESHOLD + 4096 } else { 3 << 20 };
        let mut mine = vec![7u8; 100_000];
        let pf = ReceiveMemory::new(vec![
            Target::Fresh(Buffer::zeroed(big)),
            Target::Borrowed(&mut mine),
            Target::Touched(Buffer::from_vec(vec![1; 5000])),
            Target::Fresh(Buffer::zeroed(1 << 20)),
        ]);
        assert_eq!(pf.stats().total, (big + (1 << 20)) as u64);
        for (i, len) in [(0, big), (1, 100_000), (2, 5000), (3, 1 << 20)] {
            pf.write(&[(i, 0..len / 2), (i, len / 2..len)], |p| {
                p[0].fill(i as u8 + 10);
                p[1].fill(i as u8 + 20);
            })
            .unwrap();
            assert_eq!(
                pf.read(i, len / 2 - 1..len / 2 + 1),
                Some(&[i as u8 + 10, i as u8 + 20][..])
            );
        }
        wait_done(&pf);
        let back = pf.finish();
        assert!(back[1].is_none());
        assert_eq!(back[2].as_deref().unwrap()[4999], 22);
        assert!(all_eq(&mine[..50_000], 11) && all_eq(&mine[50_000..], 21));
    }

    #[test]
    fn writes_from_several_threads_and_reads_after_landing() {
        // Region `b` is three chunks, each written by one `write` of thread `b`.
        let chunk = if MIRI { 1 << 18 } else { 1 << 20 };
        let pf = ReceiveMemory::new(
            (0..4)
                .map(|_| Target::Fresh(Buffer::zeroed(3 * chunk)))
                .collect(),
        );
        std::thread::scope(|s| {
            for b in 0..4 {
                let pf = &pf;
                s.spawn(move || {
                    for c in 0..3 {
                        // Nothing of this range is readable before it lands.
                        assert_eq!(pf.read(b, c * chunk..(c + 1) * chunk), None);
                        pf.write(&[(b, c * chunk..(c + 1) * chunk)], |p| {
                            p[0].fill(b as u8 + 1)
                        })
                        .unwrap();
                    }
                });
            }
        });
        for (b, buf) in pf.finish().iter().enumerate() {
            assert!(all_eq(buf.as_ref().unwrap(), b as u8 + 1));
        }
    }

    /// As the transport uses it: one thread receives into the regions in order (a `write` may span
    /// regions), other threads read each range as soon as it has landed (and one of them writes
    /// its own region, as the cast thread does), while the prefaulter runs ahead.
    #[test]
    fn readers_follow_the_writer() {
        let chunk = if MIRI { 3 * 4096 + 5 } else { 100_003 };
        let chunks = 8;
        let region = chunk * chunks;
        let lens = [region, region, region];
        let pats: Vec<&Pattern> = (0..3).map(|r| Pattern::new(r as u8)).collect();
        let pf = ReceiveMemory::with_options(
            vec![
                Target::Fresh(Buffer::zeroed(region)),
                Target::Fresh(Buffer::zeroed_with(region, Pages::Small)),
                // The cast thread's output.
                Target::Fresh(Buffer::zeroed(region)),
            ],
            PrefaultOptions {
                method: None,
                step: 4096,
                ..Default::default()
            },
        );
        std::thread::scope(|s| {
            let pf = &pf;
            let pats = &pats;
            // The receiver: chunk `c` of region 0, then of region 1; the last of region 0 and the
            // first of region 1 in one write.
            s.spawn(move || {
                for c in 0..chunks {
                    let mut parts = vec![(0, c * chunk..(c + 1) * chunk)];
                    if c == chunks - 1 {
                        parts.push((1, 0..chunk));
                    }
                    pf.write(&parts, |p| {
                        for (slice, (r, range)) in p.iter_mut().zip(&parts) {
                            pats[*r].fill(slice, range.start);
                        }
                    })
                    .unwrap();
                }
                for c in 1..chunks {
                    pf.write(&[(1, c * chunk..(c + 1) * chunk)], |p| {
                        pats[1].fill(p[0], c * chunk)
                    })
                    .unwrap();
                }
            });
            // A hasher: reads region 0 and 1 chunk by chunk as they land.
            s.spawn(move || {
                for (r, pat) in pats.iter().enumerate().take(2) {
                    for c in 0..chunks {
                        let range = c * chunk..(c + 1) * chunk;
                        let bytes = loop {
                            match pf.read(r, range.clone()) {
                                Some(b) => break b,
                                None => std::thread::yield_now(),
                            }
                        };
                        assert!(pat.matches(bytes, range.start), "region {r} chunk {c}");
                    }
                }
            });
            // The cast thread: copies region 1 into region 2 as it lands.
            s.spawn(move || {
                for c in 0..chunks {
                    let range = c * chunk..(c + 1) * chunk;
                    let src = loop {
                        match pf.read(1, range.clone()) {
                            Some(b) => break b,
                            None => std::thread::yield_now(),
                        }
                    };
                    pf.write(&[(2, range.clone())], |p| p[0].copy_from_slice(src))
                        .unwrap();
                }
            });
        });
        assert!(pats[1].matches(pf.read(2, 0..region).unwrap(), 0));
        let back = pf.finish();
        for (r, b) in back.iter().enumerate() {
            let b = b.as_ref().unwrap();
            assert_eq!(b.len(), lens[r]);
            assert!(pats[r.min(1)].matches(b, 0), "region {r}");
        }
    }

    /// `finish` (or dropping) stops the prefaulter wherever it is; the buffers come back intact.
    #[test]
    fn finish_and_drop_stop_the_prefaulter() {
        let len = if MIRI { 2 * MMAP_THRESHOLD } else { 32 << 20 };
        for method in supported_methods() {
            let opts = PrefaultOptions {
                method: Some(method),
                step: 4096,
                ..Default::default()
            };
            let pf = ReceiveMemory::with_options(
                vec![
                    Target::Fresh(Buffer::zeroed(len)),
                    Target::Fresh(Buffer::zeroed(len)),
                ],
                opts,
            );
            pf.write(&[(1, 100..200)], |p| p[0].fill(5)).unwrap();
            let back = pf.finish();
            assert!(all_eq(&back[0].as_ref().unwrap()[..], 0));
            let b1 = back[1].as_ref().unwrap();
            assert!(all_eq(&b1[..100], 0) && all_eq(&b1[100..200], 5) && all_eq(&b1[200..], 0));
            // Dropped while the prefaulter runs: it is stopped and joined before its buffers go.
            let mut mine = vec![9u8; 1000];
            let pf = ReceiveMemory::with_options(
                vec![
                    Target::Borrowed(&mut mine),
                    Target::Fresh(Buffer::zeroed(len)),
                ],
                opts,
            );
            pf.write(&[(0, 0..10)], |p| p[0].fill(1)).unwrap();
            drop(pf);
            assert!(all_eq(&mine[..10], 1) && all_eq(&mine[10..], 9));
        }
    }

    #[test]
    fn a_failed_write_never_lands() {
        let pf = ReceiveMemory::new(vec![Target::Fresh(Buffer::zeroed(1000))]);
        let r = pf.try_write(&[(0, 0..100)], |p| {
            p[0].fill(9);
            Err::<(), &str>("the peer went away")
        });
        assert_eq!(r, Ok(Err("the peer went away")));
        assert_eq!(pf.read(0, 0..1), None);
        // The ranges go back: the next write of them lands its own bytes (a receive that took a
        // stale message receives the next one into the same ranges).
        pf.write(&[(0, 0..100)], |p| p[0].fill(1)).unwrap();
        assert_eq!(pf.read(0, 0..100), Some(&[1; 100][..]));
    }

    #[test]
    fn overlapping_or_out_of_bounds_writes_are_refused() {
        let pf = ReceiveMemory::new(vec![Target::Fresh(Buffer::zeroed(10_000))]);
        pf.write(&[(0, 0..100)], |_| ()).unwrap();
        let overlap = pf.write(&[(0, 99..200)], |_| ()).unwrap_err();
        assert_eq!((overlap.region, overlap.range), (0, 99..200));
        assert!(pf.write(&[(0, 9000..10_001)], |_| ()).is_err());
        assert!(pf.write(&[(1, 0..1)], |_| ()).is_err());
        // A refused multi-part write hands out nothing and leaves the frontier where it was.
        assert!(pf.write(&[(0, 100..200), (0, 150..160)], |_| ()).is_err());
        pf.write(&[(0, 100..200)], |p| p[0].fill(3)).unwrap();
        assert_eq!(pf.read(0, 150..151), Some(&[3][..]));
        assert_eq!(pf.read(0, 150..201), None);
    }

    /// Two writes of one region in flight on different threads: the later one, returning first,
    /// does not land before the earlier one has (else `read` would hand out bytes still being
    /// written); a refused write meanwhile gives its claim back.
    #[test]
    fn concurrent_writes_of_one_region_land_in_claim_order() {
        let pf = ReceiveMemory::new(vec![
            Target::Touched(Buffer::zeroed(300)),
            Target::Fresh(Buffer::zeroed(300)),
        ]);
        for region in 0..2 {
            let (claimed_tx, claimed_rx) = std::sync::mpsc::channel();
            let (go_tx, go_rx) = std::sync::mpsc::channel();
            std::thread::scope(|s| {
                // Dropped if an assertion below fails, so that `first` does not wait forever.
                let go_tx = go_tx;
                let pf = &pf;
                let first = s.spawn(move || {
                    pf.write(&[(region, 0..100)], |p| {
                        claimed_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                        p[0].fill(1);
                    })
                    .unwrap();
                });
                claimed_rx.recv().unwrap();
                pf.write(&[(region, 100..200)], |p| p[0].fill(2)).unwrap();
                assert_eq!(
                    pf.read(region, 100..200),
                    None,
                    "landed past a write in flight"
                );
                assert_eq!(pf.read(region, 0..1), None);
                assert!(pf
                    .write(&[(region, 200..250), (region, 240..260)], |_| ())
                    .is_err());
                assert_eq!(pf.read(region, 100..200), None);
                go_tx.send(()).unwrap();
                first.join().unwrap();
            });
            let landed = pf.read(region, 0..200).unwrap();
            assert!(all_eq(&landed[..100], 1) && all_eq(&landed[100..], 2));
            assert_eq!(pf.read(region, 200..201), None);
            pf.write(&[(region, 200..300)], |p| p[0].fill(3)).unwrap();
            assert_eq!(pf.read(region, 299..300), Some(&[3][..]));
        }
    }

    /// An empty range claims nothing and lands nothing: the bytes below it stay unreadable, and a
    /// later write may still claim them.
    #[test]
    fn empty_writes_land_nothing() {
        let pf = ReceiveMemory::new(vec![Target::Touched(Buffer::zeroed(1000))]);
        pf.write(&[(0, 500..500)], |p| assert!(p[0].is_empty()))
            .unwrap();
        assert_eq!(pf.read(0, 0..100), None);
        pf.write(&[(0, 0..100), (0, 100..100)], |p| p[0].fill(4))
            .unwrap();
        assert_eq!(pf.read(0, 0..100).map(|b| all_eq(b, 4)), Some(true));
        assert_eq!(pf.read(0, 0..101), None);
    }

    #[test]
    fn a_failed_try_write_lands_nothing_and_can_be_written_again() {
        let pf = ReceiveMemory::new(vec![Target::Fresh(Buffer::zeroed(1000))]);
        pf.write(&[(0, 0..100)], |p| p[0].fill(1)).unwrap();
        // Two parts of one region, written, then refused: nothing lands, both go back.
        let r = pf.try_write(&[(0, 100..200), (0, 200..300)], |p| {
            p[0].fill(7);
            p[1].fill(7);
            Err::<(), _>("stale")
        });
        assert_eq!(r, Ok(Err("stale")));
        assert_eq!(pf.read(0, 100..101), None, "nothing landed");
        assert_eq!(pf.read(0, 0..100), Some(&[1; 100][..]));
        let r = pf.try_write(&[(0, 100..200), (0, 200..300)], |p| {
            p[0].fill(2);
            p[1].fill(3);
            Ok::<_, ()>(5)
        });
        assert_eq!(r, Ok(Ok(5)));
        assert_eq!(pf.read(0, 150..151), Some(&[2][..]));
        assert_eq!(pf.read(0, 250..251), Some(&[3][..]));
        assert!(
            pf.write(&[(0, 250..260)], |_| ()).is_err(),
            "landed stays written"
        );
    }

    #[test]
    fn pool_reuses_and_bounds() {
        let pool = BufferPool::new(3 << 20);
        let mut a = Buffer::zeroed(2 << 20);
        a[5] = 9;
        let addr = a.as_ptr().addr();
        assert!(pool.put(a));
        assert!(!pool.put(Buffer::zeroed(2 << 20)), "over the bound");
        assert!(pool.put(Buffer::zeroed(1 << 20)));
        assert!(!pool.put(Buffer::zeroed(0)));
        assert_eq!(pool.bytes(), 3 << 20);
        assert!(pool.take(12345).is_none());
        let (b, reused) = pool.take_or_zeroed(2 << 20);
        assert!(reused);
        assert_eq!((b.as_ptr().addr(), b[5]), (addr, 9));
        assert_eq!(pool.bytes(), 1 << 20);
        let (c, reused) = pool.take_or_zeroed(2 << 20);
        assert!(!reused && all_eq(&c, 0));
        pool.clear();
        assert_eq!(pool.bytes(), 0);
    }

    /// The pool shared by threads: buffers put by one thread, taken, written and recycled by
    /// others, as touched targets of a receive.
    #[test]
    fn pool_across_threads_and_receives() {
        let pool = BufferPool::new(1 << 20);
        let lens = [4096, 70_000, 100, 5000];
        assert_eq!(
            pool.recycle(Buffer::zeroed_many(&lens).unwrap()),
            lens.iter().sum::<usize>()
        );
        std::thread::scope(|s| {
            for t in 0..2u8 {
                let pool = &pool;
                s.spawn(move || {
                    let targets: Vec<Target<'_>> = lens
                        .iter()
                        .map(|&n| match pool.take_or_zeroed(n) {
                            (b, true) => Target::Touched(b),
                            (b, false) => Target::Fresh(b),
                        })
                        .collect();
                    let pf = ReceiveMemory::new(targets);
                    for (r, &n) in lens.iter().enumerate() {
                        pf.write(&[(r, 0..n)], |p| p[0].fill(t + 1)).unwrap();
                        assert!(all_eq(pf.read(r, 0..n).unwrap(), t + 1));
                    }
                    pool.recycle(pf.finish().into_iter().flatten());
                });
            }
        });
        assert!(pool.bytes() <= 1 << 20);
        for &n in &lens {
            let b = pool.take(n).unwrap();
            assert!(all_eq(&b, b[0]) && (b[0] == 1 || b[0] == 2));
        }
    }
}
