//! Opaque forwarding: bytes both ways, with half-close and an idle timeout.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::io::Activity;
use super::outcome::ConnOutcome;

/// Copies until both directions have closed (a half-close is passed on as
/// a write shutdown), an error occurs, or nothing moves for `idle`.
/// Returns how it ended.
pub async fn relay<D, U>(
    mut downstream: D,
    mut upstream: U,
    activity: &Activity,
    idle: Duration,
) -> ConnOutcome
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => match result {
            Ok(_) => ConnOutcome::Ok,
            Err(_) => ConnOutcome::Error,
        },
        _ = activity.idle_for(idle) => ConnOutcome::IdleTimeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_half_close_is_passed_on_and_the_reply_still_arrives() {
        let (mut client, downstream) = tokio::io::duplex(1024);
        let (upstream, mut server) = tokio::io::duplex(1024);
        let activity = Activity::new();
        let relay = tokio::spawn(async move {
            relay(downstream, upstream, &activity, Duration::from_secs(60)).await
        });

        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "server saw EOF after the request");
        server.write_all(b"reply after half-close").await.unwrap();
        drop(server);
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after half-close");
        assert_eq!(relay.await.unwrap(), ConnOutcome::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_the_idle_timeout() {
        let (_client, downstream) = tokio::io::duplex(1024);
        let (upstream, _server) = tokio::io::duplex(1024);
        let activity = Activity::new();
        let ended = relay(downstream, upstream, &activity, Duration::from_millis(10)).await;
        assert_eq!(ended, ConnOutcome::IdleTimeout);
    }
}
