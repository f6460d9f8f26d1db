//! What a long driver operation is doing, told to whoever runs it.
//!
//! The engine runs each command step inside `scope` with a reporter that records lines in the
//! command's log; a driver calls `report` while it works (the remote driver relays its agent's
//! progress: bytes pulled of a migrating guest). Outside a scope, `report` does nothing.

use std::future::Future;
use std::sync::Arc;

/// Receives what an operation is doing.
pub type Reporter = Arc<dyn Fn(&str) + Send + Sync>;

tokio::task_local! {
    static REPORTER: Reporter;
}

/// Runs `f` with `reporter` hearing every `report` made while it runs (on this task).
pub async fn scope<F: Future>(reporter: Reporter, f: F) -> F::Output {
    REPORTER.scope(reporter, f).await
}

/// Tells the current scope's reporter, if any, what the operation is doing.
pub fn report(what: &str) {
    let _ = REPORTER.try_with(|r| r(what));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn reports_reach_the_reporter_of_their_scope_only() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        let reporter: Reporter = Arc::new(move |s: &str| h.lock().unwrap().push(s.to_string()));
        report("before");
        scope(reporter, async {
            report("pulled 1 of 2 MiB");
            tokio::task::yield_now().await;
            report("importing");
        })
        .await;
        report("after");
        assert_eq!(*heard.lock().unwrap(), ["pulled 1 of 2 MiB", "importing"]);
    }
}
