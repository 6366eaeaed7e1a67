//! Sleep and timeout that arm the runtime's timer once.
//!
//! madsim's `Sleep` adds a fresh entry to the simulator's timer queue every
//! time it is polled while pending, and an entry stays queued until its
//! deadline even after the sleep is dropped. A timeout around a busy future
//! (an RPC, a Raft API call) is polled at every wake-up of its task, so it
//! used to leave dozens of dead entries per request, and popping them was a
//! tenth of the simulator's time. [`Sleep`] polls the runtime's sleep only
//! when it is not already armed for the same task; real tokio's sleep
//! re-registers in place, so there it only saves the call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

pin_project_lite::pin_project! {
    /// A sleep that registers with the timer once per waker.
    #[derive(Debug)]
    pub struct Sleep {
        #[pin]
        inner: tokio::time::Sleep,
        // The waker the timer will wake, once armed.
        armed: Option<Waker>,
    }
}

/// Sleeps for `d` (see [`Sleep`]).
pub fn sleep(d: Duration) -> Sleep {
    Sleep { inner: tokio::time::sleep(d), armed: None }
}

impl Sleep {
    pub fn is_elapsed(&self) -> bool {
        self.inner.is_elapsed()
    }
}

impl Future for Sleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Some(w) = this.armed.as_ref() {
            // The timer already holds a waker of this task and fires at the
            // deadline; polling the inner sleep again would only queue
            // another entry.
            if w.will_wake(cx.waker()) && !this.inner.is_elapsed() {
                return Poll::Pending;
            }
        }
        match this.inner.poll(cx) {
            Poll::Ready(()) => {
                *this.armed = None;
                Poll::Ready(())
            }
            Poll::Pending => {
                *this.armed = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// A timeout elapsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "deadline elapsed")
    }
}

impl std::error::Error for Elapsed {}

pin_project_lite::pin_project! {
    /// A future with a deadline; polls the inner future first, so a result
    /// that is ready at the deadline wins (deterministic either way).
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        #[pin]
        sleep: Sleep,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Runs `fut` with a deadline of `d` from now.
pub fn timeout<F: Future>(d: Duration, fut: F) -> Timeout<F> {
    Timeout { fut, sleep: sleep(d) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn timeout_fires_and_passes_results_through() {
        assert_eq!(timeout(Duration::from_millis(10), async { 7 }).await, Ok(7));
        let never = std::future::pending::<()>();
        assert_eq!(timeout(Duration::from_millis(10), never).await, Err(Elapsed));
        // A future woken many times before the deadline still completes.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        tokio::spawn(async move {
            for i in 0..50 {
                tokio::task::yield_now().await;
                if tx.send(i).await.is_err() {
                    return;
                }
            }
        });
        let got = timeout(Duration::from_secs(30), async {
            let mut last = 0;
            while let Some(i) = rx.recv().await {
                last = i;
            }
            last
        })
        .await;
        assert_eq!(got, Ok(49));
        let mut s = std::pin::pin!(sleep(Duration::from_millis(5)));
        (&mut s).await;
        assert!(s.is_elapsed());
    }
}
