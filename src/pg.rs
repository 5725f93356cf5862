//! What the gateway's two PostgreSQL stores share (the API's records, the schedules'
//! fires): creating their tables when several replicas start at once.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// Runs `ddl`, statements that create what is missing (`CREATE TABLE IF NOT EXISTS`,
/// `ADD COLUMN IF NOT EXISTS`). Two replicas running them at once can both find the table
/// missing; one then loses the race on the catalog's unique index, and what it was to
/// create exists all the same: that error counts as success.
pub async fn create_missing(client: &Client, ddl: &str) -> Result<(), tokio_postgres::Error> {
    match client.batch_execute(ddl).await {
        Err(e)
            if [
                SqlState::UNIQUE_VIOLATION,
                SqlState::DUPLICATE_TABLE,
                SqlState::DUPLICATE_COLUMN,
            ]
            .iter()
            .any(|c| e.code() == Some(c)) =>
        {
            Ok(())
        }
        r => r,
    }
}
