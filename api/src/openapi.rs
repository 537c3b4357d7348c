//! The OpenAPI description of the API, served at `/openapi.json` with a
//! browsable UI at `/docs`. It is generated from the handlers' annotations,
//! and the router takes each route's path from the same annotation, so the
//! document cannot list a path the registry does not serve.

use std::collections::BTreeMap;

use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};
use utoipa::{IntoResponses, Modify, OpenApi};

use crate::error::ErrorBody;

/// The name of the security scheme of signed requests; handlers' annotations
/// spell it as a literal, which the macro requires.
const SIGNED: &str = "signed_request";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ferry registry",
        description = "The registry and ledger web API of ferry, a marketplace of paid relays. \
            Signed requests carry the ferry-key, ferry-timestamp, ferry-nonce and ferry-signature \
            headers; docs/PROTOCOL.md gives the exact bytes signed, with test vectors. Every \
            request that moves money or changes a channel also carries an Idempotency-Key header.",
    ),
    components(schemas(ErrorBody, crate::relays::SortBy)),
    modifiers(&SignedRequests),
    tags(
        (name = "accounts", description = "Balances, statements, deposits and withdrawals"),
        (name = "channels", description = "Payment channels and settlement"),
        (name = "relays", description = "The relay market"),
        (name = "clients", description = "Where clients can be reached"),
        (name = "operations", description = "Health, readiness and metrics"),
    )
)]
pub(crate) struct ApiDoc;

struct SignedRequests;

impl Modify for SignedRequests {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SIGNED,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "ferry-signature",
                "An ed25519 signature by the key in ferry-key over the method, path and query, \
                 ferry-timestamp, ferry-nonce and blake3(body) (docs/PROTOCOL.md, \
                 \"Signed API requests\").",
            ))),
        );
    }
}

fn error_responses(list: &[(&str, &str)]) -> BTreeMap<String, RefOr<Response>> {
    list.iter()
        .map(|(status, description)| {
            let content =
                ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
            let response = ResponseBuilder::new()
                .description(*description)
                .content("application/json", content);
            ((*status).to_owned(), response.build().into())
        })
        .collect()
}

const BAD_REQUEST: (&str, &str) =
    ("400", "Malformed request: invalid_key, invalid_body, invalid_query and others");
const RATE_LIMITED: (&str, &str) =
    ("429", "rate_limited: too many requests from this address or key");
const UNAVAILABLE: (&str, &str) =
    ("503", "unavailable (the database) or timeout (the request took too long)");

/// The errors any public request may meet.
pub(crate) struct PublicErrors;

impl IntoResponses for PublicErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        error_responses(&[BAD_REQUEST, RATE_LIMITED, UNAVAILABLE])
    }
}

/// The errors any signed request may meet.
pub(crate) struct SignedErrors;

impl IntoResponses for SignedErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        error_responses(&[
            BAD_REQUEST,
            ("401", "Unsigned, forged, stale or replayed request"),
            ("403", "forbidden: signed by a key that may not do this"),
            ("413", "body_too_large"),
            RATE_LIMITED,
            UNAVAILABLE,
        ])
    }
}
