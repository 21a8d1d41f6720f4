//! A CancelRequest through a session's cancel key, as the client library sends it.

use std::time::Duration;

/// Runs `sql` (a long sleep) on `client` and, `after` its start, cancels it with the
/// session's cancel key; returns the error the statement ended with. Panics if the cancel
/// cannot be sent, or the statement does not end within 20 s or ends without an error.
pub async fn cancel_running(
    client: &tokio_postgres::Client,
    sql: &str,
    after: Duration,
) -> tokio_postgres::Error {
    let token = client.cancel_token();
    let cancel = async {
        tokio::time::sleep(after).await;
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel");
    };
    let (slept, ()) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(client.batch_execute(sql), cancel)
    })
    .await
    .expect("the cancel ends the statement");
    slept.expect_err("cancelled")
}
