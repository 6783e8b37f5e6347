//! A `diesel::sql_query` whose prepared statement a PostgreSQL connection
//! keeps, for the hot-path writes written as one hand-made statement.

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};

/// A `diesel::sql_query` whose prepared statement the connection keeps.
///
/// diesel marks every `sql_query` unsafe to cache, since its text could be
/// built at run time; diesel-async then prepares it on every call, which is
/// a second round trip and a new plan each time. Wrap only constant texts:
/// their statements are cached per connection like those of
/// diesel's query builder (keyed by the SQL text and the bind types).
pub(super) struct Cached<Q>(pub(super) Q);

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Cached<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> QueryId for Cached<Q> {
    type QueryId = ();
    // No static id: the cache key is then the SQL text and bind types.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Cached<Q> {
    type SqlType = Q::SqlType;
}
