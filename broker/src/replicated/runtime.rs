//! openraft's async runtime with a seedable random number generator.
//!
//! openraft 0.9 takes all its time from the runtime's `Instant` (tokio's, so
//! a paused tokio clock drives it) and draws its only randomness, election
//! timeouts, from `AsyncRuntime::thread_rng()`. Everything is delegated to
//! [`openraft::TokioRuntime`] except that RNG, which is a thread-local
//! `StdRng`: seeded from the OS in production, from the simulation seed in
//! the simulator (DESIGN.md §6), so that elections replay exactly.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioRuntime};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static RNG: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Seeds this thread's Raft RNG. The simulator calls it once per run before
/// creating any Raft group; production never does and gets an OS seed.
pub fn seed_thread_rng(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// Handle to the thread-local RNG; zero-sized, so cheap to hand out.
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadRng;

impl ThreadRng {
    fn with<T>(f: impl FnOnce(&mut StdRng) -> T) -> T {
        RNG.with(|r| {
            let mut slot = r.borrow_mut();
            let rng = slot.get_or_insert_with(StdRng::from_entropy);
            f(rng)
        })
    }
}

impl RngCore for ThreadRng {
    fn next_u32(&mut self) -> u32 {
        Self::with(|r| r.next_u32())
    }
    fn next_u64(&mut self) -> u64 {
        Self::with(|r| r.next_u64())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        Self::with(|r| r.fill_bytes(dest))
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        Self::with(|r| r.try_fill_bytes(dest))
    }
}

/// Tokio with a seedable RNG: the `AsyncRuntime` of [`super::TypeConfig`].
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub struct SeededRuntime;

impl AsyncRuntime for SeededRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as AsyncRuntime>::Sleep;
    type Instant = <TokioRuntime as AsyncRuntime>::Instant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> =
        <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = ThreadRng;
    type OneshotSender<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <TokioRuntime as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        ThreadRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        TokioRuntime::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws() {
        seed_thread_rng(7);
        let a: Vec<u64> = (0..4).map(|_| ThreadRng.next_u64()).collect();
        seed_thread_rng(7);
        let b: Vec<u64> = (0..4).map(|_| ThreadRng.next_u64()).collect();
        assert_eq!(a, b);
    }
}
