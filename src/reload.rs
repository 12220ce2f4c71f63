//! Hot reload: files → parse → validate → compile → atomic swap, never touching live
//! connections.
//!
//! One task owns reloading, so triggers (SIGHUP, `POST /reload`, file changes) never race.
//! Parsing and compiling run on a blocking thread so a large config (10 000 services) does
//! not stall the data path's async workers; for a large config they take a second thread
//! for a while (a big file is parsed in halves, validation runs beside linking). A config
//! that fails to load or validate is rejected whole: the previous snapshot keeps serving, the error is logged, counted
//! (`veer_config_reloads_total{result="failure"}`) and shown in `/config_dump`; a later good
//! write is picked up. Established connections hold only the `Arc<Cluster>` they were routed
//! to, so swapping the snapshot (weights, subsets, endpoints, listeners) never resets them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot};

use crate::config::ConfigErrors;
use crate::proxy::metrics::ResultLabels;
use crate::proxy::Shared;
use crate::routing::{OutboundTrafficPolicy, ProxyIdentity, Snapshot};

/// Editors and ConfigMap updates change several files in quick succession; reload once after
/// they settle.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// What the proxy's config is made from.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub paths: Vec<PathBuf>,
    pub identity: ProxyIdentity,
    pub policy: OutboundTrafficPolicy,
}

impl ConfigSource {
    /// Loads, validates and compiles (blocking: call off the async workers), taking over
    /// endpoint and cluster state from `previous`. Files unchanged since `previous` are not
    /// parsed again; `Ok(None)`: no file changed, so nothing was compiled.
    pub fn load(
        &self,
        version: u64,
        previous: Option<&Snapshot>,
    ) -> Result<Option<Snapshot>, ConfigErrors> {
        let set = match previous {
            Some(p) => {
                let (set, unchanged) =
                    crate::config::load::load_paths_reusing(&self.paths, &p.config)?;
                if unchanged.0 {
                    return Ok(None);
                }
                set
            }
            None => crate::config::load_paths(&self.paths)?,
        };
        crate::routing::recompile(set, self.identity.clone(), self.policy, version, previous)
            .map(Some)
    }
}

/// Why a reload was asked for.
#[derive(Debug)]
pub enum Trigger {
    Signal,
    Files,
    /// `POST /reload`: the caller waits for the outcome.
    Admin(oneshot::Sender<Result<Outcome, String>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Swapped { version: u64 },
    Unchanged { version: u64 },
}

/// The last rejected reload, for `/config_dump`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadError {
    pub at_unix_seconds: u64,
    pub error: String,
}

/// Runs the reload loop until the trigger channel closes. `after_swap` runs after each
/// successful swap (the gateway reconciles its listeners there).
pub async fn run(
    shared: Arc<Shared>,
    source: ConfigSource,
    mut triggers: mpsc::UnboundedReceiver<Trigger>,
    mut after_swap: impl FnMut(&Arc<Shared>),
) {
    while let Some(first) = triggers.recv().await {
        let mut waiting = Vec::new();
        let mut pending = Some(first);
        if matches!(pending, Some(Trigger::Files)) {
            tokio::time::sleep(DEBOUNCE).await;
        }
        // Coalesce whatever else arrived meanwhile into this one reload.
        while let Some(t) = pending.take().or_else(|| triggers.try_recv().ok()) {
            if let Trigger::Admin(reply) = t {
                waiting.push(reply);
            }
        }
        let result = reload_once(&shared, &source).await;
        if let Ok(Outcome::Swapped { .. }) = result {
            after_swap(&shared);
        }
        for reply in waiting {
            let _ = reply.send(result.clone());
        }
    }
}

async fn reload_once(shared: &Arc<Shared>, source: &ConfigSource) -> Result<Outcome, String> {
    let current = shared.snapshot.load_full();
    let version = current.version + 1;
    let src = source.clone();
    let previous = current.clone();
    // Comparing and dropping 10 000 services' resources takes tens to hundreds of ms: both
    // happen on the blocking thread, never on an async worker that carries connections.
    let loaded = tokio::task::spawn_blocking(move || {
        match src.load(version, Some(&previous)) {
            Ok(Some(snapshot)) if snapshot.config != previous.config => Ok(Some(snapshot)),
            // `None`: every file has the text the running config was loaded from. `Some`
            // with the same resources (an editor touched a file, a watcher fired twice):
            // keep the running snapshot so split counters and weighted-pick state carry on.
            Ok(_) => Ok(None),
            Err(errors) => Err(errors),
        }
    })
    .await
    .map_err(|e| format!("reload task failed: {e}"))?;
    let count = |r: &str| {
        shared
            .recorder
            .metrics
            .reloads
            .get_or_create(&ResultLabels { result: r.into() })
            .inc()
    };
    // Any load that succeeds clears an earlier rejection, including one that finds the config
    // in effect (a rejected edit was reverted): the rejection no longer describes the files.
    let clear_error = || {
        *shared
            .last_reload_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    };
    match loaded {
        Ok(Some(snapshot)) => {
            for w in &snapshot.warnings {
                tracing::warn!("config: {w}");
            }
            let replaced = shared.snapshot.swap(Arc::new(snapshot));
            drop(current);
            retire(replaced);
            clear_error();
            count("success");
            tracing::info!(version, "config reloaded");
            Ok(Outcome::Swapped { version })
        }
        Ok(None) => {
            clear_error();
            count("unchanged");
            Ok(Outcome::Unchanged {
                version: current.version,
            })
        }
        Err(errors) => {
            count("failure");
            let error = errors.to_string();
            tracing::error!(
                "config reload rejected; version {} stays in effect:\n{error}",
                current.version
            );
            let at_unix_seconds = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            *shared
                .last_reload_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(ReloadError {
                at_unix_seconds,
                error: error.clone(),
            });
            Err(error)
        }
    }
}

/// How often a retired snapshot checks whether the connections still routing on it are done.
const RETIRE_POLL: Duration = Duration::from_millis(50);

/// How long a retired snapshot waits for its last user before leaving the free to it, so
/// that no blocking thread lingers (the blocking pool is shared with reloads).
const RETIRE_PATIENCE: Duration = Duration::from_secs(10);

/// Frees a replaced snapshot on a blocking thread. Dropping 10 000 services' listeners,
/// clusters and resources takes 150-250 ms of `free`; on an async worker that would stall
/// every connection scheduled there. Connections hold a snapshot only while they route
/// (a TLS ClientHello peek waits 1 s at most), so the wait for the last of them is short.
pub(crate) fn retire<T: Send + Sync + 'static>(old: Arc<T>) {
    tokio::task::spawn_blocking(move || {
        let mut old = old;
        let mut waited = Duration::ZERO;
        while waited < RETIRE_PATIENCE {
            match Arc::try_unwrap(old) {
                Ok(last) => return drop(last),
                Err(shared) => old = shared,
            }
            std::thread::sleep(RETIRE_POLL);
            waited += RETIRE_POLL;
        }
    });
}

/// Watches the config paths and sends [`Trigger::Files`] on changes. Directories are watched
/// recursively (a Kubernetes ConfigMap update swaps the `..data` symlink inside the mount);
/// for a file its parent directory is watched, because editors and `kubectl cp` replace files
/// by rename, which a watch on the file itself would lose. The returned watcher must be kept.
pub fn watch(
    paths: &[PathBuf],
    tx: mpsc::UnboundedSender<Trigger>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev)
                if matches!(
                    ev.kind,
                    EventKind::Create(_)
                        | EventKind::Modify(_)
                        | EventKind::Remove(_)
                        | EventKind::Any
                ) =>
            {
                let _ = tx.send(Trigger::Files);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "config watch error"),
        })?;
    for p in paths {
        let (target, mode) = if p.is_dir() {
            (p.clone(), RecursiveMode::Recursive)
        } else {
            let parent = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            (parent.to_path_buf(), RecursiveMode::NonRecursive)
        };
        watcher.watch(&target, mode)?;
        tracing::debug!(path = %target.display(), "watching config");
    }
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::thread::ThreadId;

    /// Records the thread its value was dropped on.
    struct Dropped(Arc<Mutex<Option<ThreadId>>>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(std::thread::current().id());
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn retired_values_are_freed_off_the_async_thread_after_their_last_user() {
        let seen = Arc::new(Mutex::new(None));
        let old = Arc::new(Dropped(seen.clone()));
        let routing = old.clone(); // a connection still routing on the old snapshot
        retire(old);
        tokio::time::sleep(RETIRE_POLL * 3).await;
        assert_eq!(*seen.lock().unwrap(), None, "freed while still in use");
        // The last user lets go on the async thread; the free still happens on the blocking one.
        drop(routing);
        let mut waited = Duration::ZERO;
        while seen.lock().unwrap().is_none() {
            assert!(waited < Duration::from_secs(10), "never freed");
            tokio::time::sleep(RETIRE_POLL).await;
            waited += RETIRE_POLL;
        }
        let freed_on = seen.lock().unwrap().unwrap();
        assert_ne!(freed_on, std::thread::current().id());
    }
}
