//! `selective serve`: an OpenAI-compatible HTTP server over any
//! [`crate::nn::Decoder`] (docs/DESIGN.md §19).
//!
//! - [`engine`]: one thread owns the model and decodes every active
//!   request together, a token per step (continuous batching);
//! - [`state_cache`]: decoder states kept under their token prefixes, so a
//!   prompt that extends an earlier one runs only its new tokens;
//! - [`openai`]: the request and response bodies;
//! - [`chat`]: messages to a prompt (the model's template or the plain one);
//! - [`http`]: the routes (axum), streaming as server-sent events.
//!
//! [`serve`] puts them together: it listens at once (answering 503 while
//! the model loads), and on SIGTERM or Ctrl-C stops taking requests, lets
//! the running ones finish for up to `drain` and then cancels the rest.

pub mod chat;
pub mod engine;
pub mod http;
pub mod openai;
pub mod state_cache;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub use chat::{ChatTemplate, Message};
pub use engine::{Engine, EngineOptions, Event, Finish, JobError, JobSpec};
pub use http::{router, App, Loaded};
pub use openai::Limits;
pub use state_cache::PrefixCache;

use crate::error::{invalid, Result};

/// Where and how to listen.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    pub limits: Limits,
    /// After SIGTERM, how long running requests may go on before they are
    /// cancelled.
    pub drain: Duration,
}

/// Serves until SIGTERM or Ctrl-C. `load` runs on a blocking thread while
/// the server already answers (/health says 503 until it returns); an error
/// from it ends the server with that error. `on_listening` gets the bound
/// address (port 0 picks a free one).
pub fn serve(
    options: ServeOptions,
    threads: usize,
    load: impl FnOnce() -> Result<Loaded> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.clamp(1, 4))
        .thread_name("selective-http")
        .enable_all()
        .build()
        .map_err(|e| invalid("serve", format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .map_err(|e| invalid("serve", format!("cannot listen on {}: {e}", options.addr)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| invalid("serve", format!("no local address: {e}")))?;
        let app = App::new(options.limits.clone());
        // A failed load ends the server with its error.
        let failure = Arc::new(std::sync::Mutex::new(None));
        let (load_failed_tx, load_failed) = tokio::sync::oneshot::channel::<()>();
        {
            let (app, failure) = (app.clone(), failure.clone());
            tokio::task::spawn_blocking(move || match load() {
                Ok(loaded) => app.set_loaded(loaded),
                Err(e) => {
                    eprintln!("selective serve: loading the model failed: {e}");
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    let _ = load_failed_tx.send(());
                }
            });
        }
        on_listening(addr);
        let shutdown_app = app.clone();
        let drain = options.drain;
        // On a signal: refuse new requests (503, /health too) while the
        // listener stays open, so that a load balancer sees the drain; once
        // the engine is idle, or the drain time is up (then the rest are
        // cancelled), let axum close the listener and finish the
        // connections.
        let shutdown = async move {
            let signalled = tokio::select! {
                _ = terminate_signal() => true,
                _ = load_failed_wait(load_failed) => false,
            };
            let Some(loaded) = shutdown_app.loaded().filter(|_| signalled) else {
                return;
            };
            eprintln!("selective serve: shutting down (running requests have {drain:?} to finish)");
            loaded.engine.stop_accepting();
            let deadline = tokio::time::Instant::now() + drain;
            let counters = &loaded.engine.counters;
            while counters.running.load(Ordering::SeqCst) + counters.queued.load(Ordering::SeqCst)
                > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            loaded.engine.stop();
        };
        axum::serve(listener, router(app.clone()))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| invalid("serve", format!("the HTTP server failed: {e}")))?;
        if let Some(loaded) = app.loaded() {
            loaded.engine.stop();
        }
        let failed = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
}

/// Resolves when loading has failed; never when it succeeded.
async fn load_failed_wait(failed: tokio::sync::oneshot::Receiver<()>) {
    if failed.await.is_err() {
        // loading succeeded (the sender was dropped)
        std::future::pending::<()>().await
    }
}

/// SIGTERM or Ctrl-C (SIGINT).
async fn terminate_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
