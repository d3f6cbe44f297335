//! A console relayed in userspace allocates nothing per message: a farm of thousands of
//! typing consoles wakes relay tens of thousands of times a second, and an allocation per
//! wake-up showed in its CPU. Counted by a global allocator of this test binary's own, on
//! the one thread that runs the relay, the viewer and the hypervisor.
#![allow(unsafe_code)] // A counting global allocator: GlobalAlloc is an unsafe trait.

use relay::relay::copy::{self, HandOver};
use relay::relay::{Control, Established, Limits};
use relay::session::Shared;
use relay::wire::prefixed::Prefixed;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: a thread being torn down has no slot left, and is not measured.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call goes straight to the system allocator with the caller's layout; the
// count is a thread-local cell with a const initialiser, which itself never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// A connected pair of loopback sockets: (the far end, relay's end).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let far = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (near, _) = listener.accept().await.unwrap();
    far.set_nodelay(true).unwrap();
    near.set_nodelay(true).unwrap();
    (far, near)
}

/// Relays a console on `copy` (with the hand-over rule `auto` gives a console, or none)
/// and returns the allocations made on this thread over `messages` round trips of a
/// typing-sized message, after a warm-up.
async fn allocations_per_round_trips(hand_over: Option<HandOver>, messages: usize) -> u64 {
    let (mut viewer, relay_viewer) = pair().await;
    let (mut hypervisor, relay_hypervisor) = pair().await;
    let pair = Established { viewer: Prefixed::bare(relay_viewer), hypervisor: Prefixed::bare(relay_hypervisor) };
    let mut control = Control { session: 1, shared: Arc::new(Shared::default()) };
    let limits = Limits::new(32 << 10, Some(Duration::from_secs(3600)), Duration::from_secs(30), None);
    let relaying = tokio::spawn(async move {
        let mut pumps = copy::pumps(pair, &control, &limits, hand_over);
        copy::run(&mut pumps, &mut control, &limits).await
    });
    let message = [7u8; 256];
    let mut back = [0u8; 256];
    let mut round_trip = async |viewer: &mut TcpStream, hypervisor: &mut TcpStream| {
        viewer.write_all(&message).await.unwrap();
        hypervisor.read_exact(&mut back).await.unwrap();
        hypervisor.write_all(&back).await.unwrap();
        viewer.read_exact(&mut back).await.unwrap();
        assert_eq!(back, message);
    };
    // The first messages set up what stays: the thread's scratch buffer, the runtime's
    // queues, the sockets' registrations.
    for _ in 0..100 {
        round_trip(&mut viewer, &mut hypervisor).await;
    }
    let before = allocations();
    for _ in 0..messages {
        round_trip(&mut viewer, &mut hypervisor).await;
    }
    let made = allocations() - before;
    drop((viewer, hypervisor));
    let ended = relaying.await.unwrap();
    assert!(ended.is_some(), "the console ended when both sides closed");
    made
}

#[test]
fn a_console_in_userspace_allocates_nothing_per_message() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    const MESSAGES: usize = 2000;
    // Each round trip is a message each way: 4,000 relayed messages. A few allocations of
    // the runtime's own (a queue that grows once) may fall in the window; one a message
    // would be thousands.
    let on_copy = runtime.block_on(allocations_per_round_trips(None, MESSAGES));
    assert!(on_copy < 16, "copy: {on_copy} allocations over {MESSAGES} round trips");
    let auto = HandOver { after: Duration::from_secs(1), min_rate: 1 << 20, quiet: true };
    let on_auto = runtime.block_on(allocations_per_round_trips(Some(auto), MESSAGES));
    assert!(on_auto < 16, "auto, before its hand-over: {on_auto} allocations over {MESSAGES} round trips");
}
