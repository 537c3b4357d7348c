//! The registry's web page: a relay explorer in plain HTML, CSS and
//! JavaScript that reads the public JSON API. The files are compiled into
//! the binary, so a registry serves its page with nothing else installed.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// Scripts, styles and data come from the registry itself and nowhere else;
/// the page renders relay-chosen text as text, and this is the second fence.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The page's routes: `/` and its two assets.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", include_str!("../web/index.html"))))
        .route(
            "/assets/app.js",
            get(|| asset("text/javascript; charset=utf-8", include_str!("../web/app.js"))),
        )
        .route(
            "/assets/app.css",
            get(|| asset("text/css; charset=utf-8", include_str!("../web/app.css"))),
        )
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Small files that change with the binary: revalidate each time.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
