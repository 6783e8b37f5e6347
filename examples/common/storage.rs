//! What a daemon's database holds, read from outside the daemon: the size of
//! the database (and of the SQLite WAL) and the rows it keeps, so that a soak
//! can tell a database that grows with its data from one that grows without
//! bound.

use std::path::PathBuf;

use diesel::QueryableByName;
use diesel::sql_types::BigInt;

/// The tables the soak's traffic writes to; their rows are the data kept.
const KEPT_TABLES: [&str; 8] = [
    "jobs",
    "job_history",
    "job_labels",
    "webhook_deliveries",
    "federation_command_log",
    "federation_seen_messages",
    "agents",
    "agent_events",
];

/// Where a daemon's database is.
#[derive(Debug, Clone)]
pub enum StorageProbe {
    /// A SQLite file (and its `-wal` beside it).
    Sqlite { path: PathBuf },
    /// A PostgreSQL database.
    Postgres { url: String },
}

/// One reading of a database.
#[derive(Debug, Clone, Copy, Default)]
pub struct StorageReading {
    /// The database's size: the SQLite file without its WAL, or
    /// `pg_database_size`.
    pub database_bytes: u64,
    /// Rows in `KEPT_TABLES`.
    pub rows: u64,
    /// Jobs that ended (the ones retention prunes).
    pub ended_jobs: u64,
}

#[derive(QueryableByName)]
struct Counts {
    #[diesel(sql_type = BigInt)]
    rows: i64,
    #[diesel(sql_type = BigInt)]
    ended_jobs: i64,
}

#[derive(QueryableByName)]
struct Size {
    #[diesel(sql_type = BigInt)]
    bytes: i64,
}

impl StorageProbe {
    /// The probe of the database at `database_url` (as a daemon is given it).
    pub fn of(database_url: &str) -> StorageProbe {
        match database_url.strip_prefix("sqlite://") {
            Some(path) => StorageProbe::Sqlite {
                path: PathBuf::from(path),
            },
            None => StorageProbe::Postgres {
                url: database_url.to_owned(),
            },
        }
    }

    /// The SQLite WAL's length now (0 on PostgreSQL, whose WAL is the
    /// server's, not one database's).
    pub fn wal_bytes(&self) -> u64 {
        match self {
            StorageProbe::Sqlite { path } => {
                let mut wal = path.clone().into_os_string();
                wal.push("-wal");
                std::fs::metadata(wal).map_or(0, |file| file.len())
            }
            StorageProbe::Postgres { .. } => 0,
        }
    }

    /// Reads the database's size and the rows it keeps. On SQLite this is a
    /// short read transaction on a connection of its own, like any other
    /// reader in another process.
    pub async fn read(&self) -> anyhow::Result<StorageReading> {
        let counts = format!(
            "SELECT ({}) AS rows, (SELECT count(*) FROM jobs WHERE ended_at_ms IS NOT NULL) AS ended_jobs",
            KEPT_TABLES
                .iter()
                .map(|table| format!("(SELECT count(*) FROM {table})"))
                .collect::<Vec<_>>()
                .join(" + ")
        );
        match self {
            StorageProbe::Sqlite { path } => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    use diesel::{Connection as _, RunQueryDsl as _};
                    let database_bytes = std::fs::metadata(&path)?.len();
                    let mut connection =
                        diesel::SqliteConnection::establish(&path.to_string_lossy())?;
                    let counts: Counts = diesel::sql_query(counts).get_result(&mut connection)?;
                    Ok(reading(database_bytes, &counts))
                })
                .await?
            }
            StorageProbe::Postgres { url } => {
                use diesel_async::{AsyncConnection as _, RunQueryDsl as _};
                let mut connection = diesel_async::AsyncPgConnection::establish(url).await?;
                let counts: Counts = diesel::sql_query(counts)
                    .get_result(&mut connection)
                    .await?;
                let size: Size =
                    diesel::sql_query("SELECT pg_database_size(current_database()) AS bytes")
                        .get_result(&mut connection)
                        .await?;
                Ok(reading(u64::try_from(size.bytes).unwrap_or(0), &counts))
            }
        }
    }
}

fn reading(database_bytes: u64, counts: &Counts) -> StorageReading {
    StorageReading {
        database_bytes,
        rows: u64::try_from(counts.rows).unwrap_or(0),
        ended_jobs: u64::try_from(counts.ended_jobs).unwrap_or(0),
    }
}
