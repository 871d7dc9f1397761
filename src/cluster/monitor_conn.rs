//! A kept connection as the `[monitor]` role, shared by the background checks
//! (health, `sr_check`, replay positions).
//!
//! Why keep connections: a new PostgreSQL connection costs the server a fork
//! plus backend start-up (several milliseconds of CPU), so opening one per
//! check per node is the largest cost of an idle pgpilot. A kept connection
//! makes each check one short query. The connection's driver task runs on its
//! own; dropping a [`MonitorConn`] sends Terminate and aborts the driver a
//! moment later, so a connection stuck on a dead peer cannot linger.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::config::{Backend, Monitor};

/// How long a dropped connection's driver may take to finish before it is aborted.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// An open connection to one node as the monitor role.
pub(crate) struct MonitorConn {
    /// The query handle.
    client: tokio_postgres::Client,
    /// Drives the connection; aborted shortly after the client is dropped.
    driver: Option<JoinHandle<()>>,
    /// Address it was opened to: a reload may point a node elsewhere.
    addr: (String, u16),
    /// When it was opened (health checks renew their connection periodically).
    opened: Instant,
}

impl MonitorConn {
    /// Connect to `backend` as the monitor role, naming the connection
    /// `application_name`. The caller bounds the time.
    pub(crate) async fn open(
        backend: &Backend,
        monitor: &Monitor,
        application_name: &str,
    ) -> Result<MonitorConn, tokio_postgres::Error> {
        let pg = super::monitor_conn_config(backend, monitor, application_name);
        let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(async move {
            // The query that was waiting fails with the same error and is
            // reported by its caller; this only leaves a trace for debugging.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "monitor connection ended with an error");
            }
        });
        Ok(MonitorConn {
            client,
            driver: Some(driver),
            addr: (backend.host.clone(), backend.port),
            opened: Instant::now(),
        })
    }

    /// The query handle.
    pub(crate) fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// Still open, and to `backend`'s address.
    pub(crate) fn serves(&self, backend: &Backend) -> bool {
        self.addr.0 == backend.host && self.addr.1 == backend.port && !self.client.is_closed()
    }

    /// Time since the connection was opened.
    pub(crate) fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// Close politely: Terminate, then wait (up to a second) for the server to
    /// end the connection, so the node does not log an unexpected EOF.
    pub(crate) async fn close(mut self) {
        let driver = self.driver.take();
        drop(self);
        if let Some(driver) = driver
            && tokio::time::timeout(CLOSE_GRACE, driver).await.is_err()
        {
            tracing::debug!("monitor connection did not close in time");
        }
    }
}

impl Drop for MonitorConn {
    fn drop(&mut self) {
        // The client is dropped right after this (sending Terminate); the
        // driver gets a moment to finish, then is aborted.
        if let (Some(driver), Ok(rt)) = (self.driver.take(), tokio::runtime::Handle::try_current())
        {
            rt.spawn(async move {
                tokio::time::sleep(CLOSE_GRACE).await;
                driver.abort();
            });
        }
    }
}
