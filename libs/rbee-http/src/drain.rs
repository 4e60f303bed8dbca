//! Drain guards for HTTP exchanges: each request holds a [`rbee_lifecycle::DrainGuard`] from
//! its arrival until its response body is dropped (a stream's end, or its client leaving), so
//! a daemon's shutdown wakes when an exchange ends instead of polling its counters.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use rbee_lifecycle::{Drain, DrainGuard};

/// `router` with every exchange holding a guard of `drain`.
pub fn hold_drain<S: Clone + Send + Sync + 'static>(router: Router<S>, drain: Drain) -> Router<S> {
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let guard = drain.guard();
            Held {
                response: Box::pin(next.run(req)),
                guard: Some(guard),
            }
        },
    ))
}

type ResponseFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// The handler's future, then its response body, with the guard dropped after them (fields
/// drop in order), so whatever they hold is released before the wake-up.
struct Held {
    response: ResponseFuture,
    guard: Option<DrainGuard>,
}

impl Future for Held {
    type Output = Response;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        let response = std::task::ready!(self.response.as_mut().poll(cx));
        let guard = self.guard.take();
        Poll::Ready(response.map(|body| {
            Body::new(HeldBody {
                body,
                _guard: guard,
            })
        }))
    }
}

struct HeldBody {
    body: Body,
    _guard: Option<DrainGuard>,
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Records how many guards were held when it was dropped.
    struct Witness(Drain, Arc<AtomicUsize>);

    impl Drop for Witness {
        fn drop(&mut self) {
            self.1.store(self.0.active(), Ordering::SeqCst);
        }
    }

    /// An empty body that owns a witness, as a stream owns its request's counters.
    struct WitnessBody(#[allow(dead_code)] Witness);

    impl http_body::Body for WitnessBody {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(None)
        }
    }

    #[tokio::test]
    async fn the_guard_lives_as_long_as_the_body_and_drops_after_it() {
        let drain = Drain::new();
        let seen = Arc::new(AtomicUsize::new(usize::MAX));
        let witness = Witness(drain.clone(), seen.clone());
        let held = Held {
            response: Box::pin(async move { Response::new(Body::new(WitnessBody(witness))) }),
            guard: Some(drain.guard()),
        };
        let response = held.await;
        assert_eq!(drain.active(), 1, "the body holds the guard");
        drop(response);
        assert_eq!(seen.load(Ordering::SeqCst), 1, "the body went first");
        assert_eq!(drain.active(), 0);
    }

    #[tokio::test]
    async fn a_handler_dropped_midway_releases_its_guard_after_its_state() {
        let drain = Drain::new();
        let seen = Arc::new(AtomicUsize::new(usize::MAX));
        let witness = Witness(drain.clone(), seen.clone());
        let mut held = Held {
            response: Box::pin(async move {
                let _w = witness;
                std::future::pending::<Response>().await
            }),
            guard: Some(drain.guard()),
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut held).poll(&mut cx).is_pending());
        drop(held);
        assert_eq!(
            seen.load(Ordering::SeqCst),
            1,
            "the handler's state went first"
        );
        assert_eq!(drain.active(), 0);
    }
}
