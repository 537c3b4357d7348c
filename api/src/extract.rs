//! What a request's path and query hold, parsed strictly and refused with a
//! JSON error that names the broken rule: the one place where the API reads
//! them, so every handler refuses bad input the same way.

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use ferry_proto::{ChannelId, PublicKey};
use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, Error as _};
use utoipa::openapi::Required;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};

use crate::ApiError;

/// The `{key}` of a path: a public key, 64 lowercase hex digits.
#[derive(Debug)]
pub(crate) struct KeyPath(pub PublicKey);

impl<S: Send + Sync> FromRequestParts<S> for KeyPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<KeyPath, ApiError> {
        let text = path_text(parts, state, "invalid_key").await?;
        text.parse()
            .map(KeyPath)
            .map_err(|error| ApiError::bad_request("invalid_key", format!("{error}")))
    }
}

/// The `{id}` of a path: a channel id, 64 lowercase hex digits.
#[derive(Debug)]
pub(crate) struct ChannelPath(pub ChannelId);

impl<S: Send + Sync> FromRequestParts<S> for ChannelPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<ChannelPath, ApiError> {
        let text = path_text(parts, state, "invalid_channel").await?;
        text.parse()
            .map(ChannelPath)
            .map_err(|error| ApiError::bad_request("invalid_channel", format!("{error}")))
    }
}

impl utoipa::IntoParams for KeyPath {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![hex_path_parameter("key", "A public key, 64 lowercase hex digits")]
    }
}

impl utoipa::IntoParams for ChannelPath {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![hex_path_parameter("id", "A channel id, 64 lowercase hex digits")]
    }
}

/// The OpenAPI form of a 32-byte path parameter: exactly what the
/// extractors accept.
fn hex_path_parameter(name: &str, description: &str) -> Parameter {
    let schema = ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[0-9a-f]{64}$"));
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

/// The one path parameter of a route, as text; a segment that does not
/// decode to UTF-8 is refused with `code`.
async fn path_text<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
    code: &'static str,
) -> Result<String, ApiError> {
    let Path(text) = Path::<String>::from_request_parts(parts, state).await.map_err(|_| {
        ApiError::bad_request(code, "the path parameter is not percent-encoded UTF-8")
    })?;
    Ok(text)
}

/// A query string parsed into `T`, whose fields say what they accept; an
/// unknown or malformed parameter is `400 invalid_query`.
#[derive(Debug)]
pub(crate) struct StrictQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for StrictQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<StrictQuery<T>, ApiError> {
        let Query(query) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|error| ApiError::bad_request("invalid_query", error.body_text()))?;
        Ok(StrictQuery(query))
    }
}

/// Parses the one text form of a whole number: decimal digits, no sign, no
/// leading zero (but `0` itself), at most `max`. Two texts for one number
/// would let two requests that mean the same differ, and the reverse.
pub(crate) fn whole_number(text: &str, max: u64) -> Result<u64, String> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return Err(format!(
            "{:?} is not a whole number (decimal digits without sign or leading zeros)",
            text.chars().take(32).collect::<String>()
        ));
    }
    match text.parse::<u64>() {
        Ok(number) if number <= max => Ok(number),
        _ => Err(format!("{text} is above the maximum of {max}")),
    }
}

/// Serde's reader for an optional whole-number query parameter of at most
/// `u32::MAX`, in [`whole_number`]'s one text form.
pub(crate) fn optional_u32<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let number = whole_number(&text, u64::from(u32::MAX)).map_err(D::Error::custom)?;
    Ok(Some(u32::try_from(number).map_err(D::Error::custom)?))
}

/// Serde's reader for an optional transfer id (`before=`): a whole number
/// from 1 to `i64::MAX`, in [`whole_number`]'s one text form.
pub(crate) fn optional_transfer_id<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<i64>, D::Error> {
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let number = whole_number(&text, i64::MAX as u64).map_err(D::Error::custom)?;
    if number == 0 {
        return Err(D::Error::custom("a transfer id is at least 1"));
    }
    Ok(Some(i64::try_from(number).map_err(D::Error::custom)?))
}

/// Serde's reader for an optional region filter, checked by the same rule
/// as an advert's region.
pub(crate) fn optional_region<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    ferry_proto::check_region(&text).map_err(D::Error::custom)?;
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::whole_number;

    #[test]
    fn a_whole_number_has_one_text_form() {
        assert_eq!(whole_number("0", 10), Ok(0));
        assert_eq!(whole_number("10", 10), Ok(10));
        for bad in ["", "+1", "-1", "01", "00", " 1", "1 ", "1.0", "1e3", "0x1", "١"] {
            assert!(whole_number(bad, 10).is_err(), "{bad:?}");
        }
        let above = whole_number("11", 10).unwrap_err();
        assert!(above.contains("maximum of 10"), "{above}");
        assert!(whole_number("99999999999999999999999", u64::MAX).is_err());
    }
}
