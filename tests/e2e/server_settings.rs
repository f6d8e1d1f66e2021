//! A PostgreSQL set up by a DBA, not by us: server and database defaults bulkflow must not
//! inherit where its statements assume otherwise.

use bulkflow::store::Db;

use crate::helpers::pg_url;

/// A database whose default isolation is SERIALIZABLE (as some DBAs set it "to be safe"):
/// bulkflow's pooled sessions run READ COMMITTED anyway, which its lease, fence and limit
/// statements assume. Before the fix every pooled session inherited SERIALIZABLE.
#[sqlx::test]
async fn a_database_defaulting_to_serializable_gets_read_committed_sessions(pool: sqlx::PgPool) {
    let url = pg_url(&Db::Postgres(pool.clone())).await;
    sqlx::query(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation = %L', \
         current_database(), 'serializable'); END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    // The setting is really in force for a new session that does not override it.
    let plain = sqlx::PgPool::connect(&url).await.unwrap();
    let inherited: String = sqlx::query_scalar("SHOW transaction_isolation")
        .fetch_one(&plain)
        .await
        .unwrap();
    assert_eq!(inherited, "serializable");
    plain.close().await;

    let db = Db::connect(&url, 8).await.unwrap();
    let Db::Postgres(ours) = &db else {
        unreachable!()
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut conn = ours.acquire().await.unwrap();
        let level: String = sqlx::query_scalar("SHOW transaction_isolation")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(
            level, "read committed",
            "a pooled session inherited the default"
        );
        held.push(conn);
    }
}
