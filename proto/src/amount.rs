//! Exact money amounts and per-byte prices.
//!
//! Both are fixed-point decimals with [`AMOUNT_SCALE`] fraction digits, held as
//! an integer count of the smallest unit (10^-18 of a unit, an "atto") so every
//! operation is exact integer arithmetic. Arithmetic is checked: it errors on
//! overflow past [`MAX_AMOUNT`] and on a result below zero, because money in
//! ferry is never negative and never silently rounded.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

use crate::serde_str::serde_via_str;

/// The number of fraction digits every amount and price may carry.
pub const AMOUNT_SCALE: u32 = 18;

/// The largest amount ferry handles, in whole units: ten billion.
///
/// The bound keeps every amount inside `rust_decimal` (28 significant digits)
/// and Postgres `NUMERIC(28, 18)` with room to spare.
pub const MAX_AMOUNT: u64 = 10_000_000_000;

/// Bytes in a GiB, the unit in which prices are shown to people.
pub const BYTES_PER_GIB: u64 = 1 << 30;

const ATTOS_PER_UNIT: u128 = 1_000_000_000_000_000_000;
const MAX_ATTOS: u128 = MAX_AMOUNT as u128 * ATTOS_PER_UNIT;
/// The highest price per byte ferry accepts: one whole unit per byte.
const MAX_PRICE_ATTOS: u128 = ATTOS_PER_UNIT;

/// Why a number is not a valid amount or price.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Amounts and prices are never negative.
    #[error("amount must not be negative")]
    Negative,
    /// More fraction digits than [`AMOUNT_SCALE`].
    #[error("amount has {digits} decimal places; at most {AMOUNT_SCALE} are allowed")]
    TooPrecise {
        /// How many fraction digits the input had.
        digits: u32,
    },
    /// Above [`MAX_AMOUNT`].
    #[error("amount is larger than the maximum of {MAX_AMOUNT}")]
    TooLarge,
    /// A price above one unit per byte.
    #[error("price is larger than the maximum of 1 per byte")]
    PriceTooLarge,
    /// Not a plain decimal number such as `12` or `0.000125`.
    #[error("not a decimal number: {0:?} (expected digits with an optional '.' and fraction)")]
    Malformed(String),
    /// A subtraction whose result would be below zero.
    #[error("result would be negative")]
    Underflow,
}

/// A non-negative amount of money with at most [`AMOUNT_SCALE`] decimals and at
/// most [`MAX_AMOUNT`] units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount {
    attos: u128,
}

impl Amount {
    /// No money.
    pub const ZERO: Amount = Amount { attos: 0 };
    /// The largest amount: [`MAX_AMOUNT`] units.
    pub const MAX: Amount = Amount { attos: MAX_ATTOS };

    /// The amount of `attos` (10^-18 units), if it is at most [`MAX_AMOUNT`].
    pub fn from_attos(attos: u128) -> Result<Amount, AmountError> {
        if attos > MAX_ATTOS {
            return Err(AmountError::TooLarge);
        }
        Ok(Amount { attos })
    }

    /// A whole number of units.
    pub fn from_units(units: u64) -> Result<Amount, AmountError> {
        Amount::from_attos(u128::from(units) * ATTOS_PER_UNIT)
    }

    /// The amount as a count of 10^-18 units; this is the form that is signed.
    pub fn attos(self) -> u128 {
        self.attos
    }

    /// The amount as an exact decimal with trailing zeros removed.
    pub fn to_decimal(self) -> Decimal {
        // MAX_ATTOS < 2^96, so the mantissa always fits a Decimal.
        Decimal::from_i128_with_scale(self.attos as i128, AMOUNT_SCALE).normalize()
    }

    /// Whether this is zero.
    pub fn is_zero(self) -> bool {
        self.attos == 0
    }

    /// `self + other`, or [`AmountError::TooLarge`] past [`MAX_AMOUNT`].
    pub fn checked_add(self, other: Amount) -> Result<Amount, AmountError> {
        Amount::from_attos(self.attos + other.attos)
    }

    /// `self - other`, or [`AmountError::Underflow`] below zero.
    pub fn checked_sub(self, other: Amount) -> Result<Amount, AmountError> {
        self.attos
            .checked_sub(other.attos)
            .map(|attos| Amount { attos })
            .ok_or(AmountError::Underflow)
    }

    /// The share of `basis_points` (1/10,000ths) of this amount, rounded down
    /// to the smallest unit, so a fee never exceeds its rate.
    pub fn basis_points(self, basis_points: u16) -> Amount {
        let basis_points = u128::from(basis_points.min(10_000));
        // attos <= 10^28 and basis_points <= 10^4: the product fits in u128.
        Amount { attos: self.attos * basis_points / 10_000 }
    }
}

impl TryFrom<Decimal> for Amount {
    type Error = AmountError;

    fn try_from(value: Decimal) -> Result<Amount, AmountError> {
        attos_from_decimal(value).and_then(Amount::from_attos)
    }
}

impl FromStr for Amount {
    type Err = AmountError;

    fn from_str(text: &str) -> Result<Amount, AmountError> {
        parse_attos(text).and_then(Amount::from_attos)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_attos(f, false, self.attos)
    }
}

serde_via_str!(
    Amount,
    "a decimal amount as a string, such as \"12.5\" (at most 18 decimals)",
    r"^[0-9]+(\.[0-9]+)?$"
);

/// An account balance: like an [`Amount`] but signed and unbounded by
/// [`MAX_AMOUNT`], because the ledger's outside-world account goes below zero
/// by everything deposited, and sums of many amounts exceed one amount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Balance {
    attos: i128,
}

impl Balance {
    /// A zero balance.
    pub const ZERO: Balance = Balance { attos: 0 };

    /// The balance as a signed count of 10^-18 units.
    pub fn attos(self) -> i128 {
        self.attos
    }

    /// The balance after `amount` comes in, or [`AmountError::TooLarge`] on
    /// overflow.
    pub fn checked_add(self, amount: Amount) -> Result<Balance, AmountError> {
        let amount = i128::try_from(amount.attos).map_err(|_| AmountError::TooLarge)?;
        self.attos.checked_add(amount).map(|attos| Balance { attos }).ok_or(AmountError::TooLarge)
    }

    /// The balance after `amount` goes out, or [`AmountError::TooLarge`] on
    /// overflow. It may become negative; callers decide whether that is allowed.
    pub fn checked_sub(self, amount: Amount) -> Result<Balance, AmountError> {
        let amount = i128::try_from(amount.attos).map_err(|_| AmountError::TooLarge)?;
        self.attos.checked_sub(amount).map(|attos| Balance { attos }).ok_or(AmountError::TooLarge)
    }

    /// The balance as an amount, if it is not negative and not above [`MAX_AMOUNT`].
    pub fn to_amount(self) -> Result<Amount, AmountError> {
        let attos = u128::try_from(self.attos).map_err(|_| AmountError::Negative)?;
        Amount::from_attos(attos)
    }
}

impl From<Amount> for Balance {
    fn from(amount: Amount) -> Balance {
        // Amounts are at most 10^28 attos, far inside i128.
        Balance { attos: amount.attos as i128 }
    }
}

impl FromStr for Balance {
    type Err = AmountError;

    fn from_str(text: &str) -> Result<Balance, AmountError> {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let magnitude = i128::try_from(parse_attos(digits)?).map_err(|_| AmountError::TooLarge)?;
        Ok(Balance { attos: if negative { -magnitude } else { magnitude } })
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_attos(f, self.attos < 0, self.attos.unsigned_abs())
    }
}

serde_via_str!(
    Balance,
    "a signed decimal balance as a string, such as \"-12.5\"",
    r"^-?[0-9]+(\.[0-9]+)?$"
);

/// A non-negative price for one byte carried, with at most [`AMOUNT_SCALE`]
/// decimals and at most one unit per byte.
///
/// Prices are set and signed per byte so that a bill is always exactly
/// `bytes × price`; they are shown to people per GiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PricePerByte {
    attos: u128,
}

impl PricePerByte {
    /// Carrying bytes for free.
    pub const FREE: PricePerByte = PricePerByte { attos: 0 };

    /// The price of `attos` (10^-18 units) per byte.
    pub fn from_attos(attos: u128) -> Result<PricePerByte, AmountError> {
        if attos > MAX_PRICE_ATTOS {
            return Err(AmountError::PriceTooLarge);
        }
        Ok(PricePerByte { attos })
    }

    /// The price as a count of 10^-18 units per byte; this is the signed form.
    pub fn attos(self) -> u128 {
        self.attos
    }

    /// The price per byte as an exact decimal.
    pub fn to_decimal(self) -> Decimal {
        Decimal::from_i128_with_scale(self.attos as i128, AMOUNT_SCALE).normalize()
    }

    /// The exact price of one GiB, the figure shown to people.
    pub fn per_gib(self) -> Amount {
        // attos <= 10^18 and a GiB is 2^30 bytes: at most ~1.07 * 10^27 attos.
        Amount { attos: self.attos * u128::from(BYTES_PER_GIB) }
    }
}

impl TryFrom<Decimal> for PricePerByte {
    type Error = AmountError;

    fn try_from(value: Decimal) -> Result<PricePerByte, AmountError> {
        attos_from_decimal(value).map_err(price_error).and_then(PricePerByte::from_attos)
    }
}

/// A number too large for any amount is, as a price, above the price's
/// maximum: the error names the bound the caller broke.
fn price_error(error: AmountError) -> AmountError {
    match error {
        AmountError::TooLarge => AmountError::PriceTooLarge,
        other => other,
    }
}

impl FromStr for PricePerByte {
    type Err = AmountError;

    fn from_str(text: &str) -> Result<PricePerByte, AmountError> {
        parse_attos(text).map_err(price_error).and_then(PricePerByte::from_attos)
    }
}

impl fmt::Display for PricePerByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_attos(f, false, self.attos)
    }
}

serde_via_str!(
    PricePerByte,
    "a decimal price per byte as a string, such as \"0.00000000005\" (at most 1)",
    r"^[0-9]+(\.[0-9]+)?$"
);

/// The exact cost of carrying `bytes` at `price`: `bytes × price`.
pub fn cost(bytes: u64, price: PricePerByte) -> Result<Amount, AmountError> {
    // u64 * 10^18 < 2^128, so the product cannot wrap; only the bound can fail.
    Amount::from_attos(u128::from(bytes) * price.attos)
}

fn attos_from_decimal(value: Decimal) -> Result<u128, AmountError> {
    if value.is_sign_negative() && !value.is_zero() {
        return Err(AmountError::Negative);
    }
    let value = value.normalize();
    let digits = value.scale();
    if digits > AMOUNT_SCALE {
        return Err(AmountError::TooPrecise { digits });
    }
    let mantissa = value.mantissa().unsigned_abs();
    mantissa.checked_mul(10u128.pow(AMOUNT_SCALE - digits)).ok_or(AmountError::TooLarge)
}

/// Parses the strict text form `DIGITS[.DIGITS]`: no sign, exponent, spaces or
/// separators, so every accepted string means exactly one amount.
fn parse_attos(text: &str) -> Result<u128, AmountError> {
    let malformed = || AmountError::Malformed(text.chars().take(64).collect());
    if let Some(rest) = text.strip_prefix('-') {
        return match parse_attos(rest) {
            Ok(_) => Err(AmountError::Negative),
            Err(error) => Err(error),
        };
    }
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (text, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return Err(malformed());
    }
    if text.contains('.') && fraction.is_empty() {
        return Err(malformed());
    }
    let fraction = fraction.trim_end_matches('0');
    let digits = u32::try_from(fraction.len()).unwrap_or(u32::MAX);
    if digits > AMOUNT_SCALE {
        return Err(AmountError::TooPrecise { digits });
    }
    let whole = whole.trim_start_matches('0');
    // More than 20 integer digits cannot be below any bound we check.
    if whole.len() > 20 {
        return Err(AmountError::TooLarge);
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| malformed())? };
    let fraction_attos: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<u128>().map_err(|_| malformed())? * 10u128.pow(AMOUNT_SCALE - digits)
    };
    whole
        .checked_mul(ATTOS_PER_UNIT)
        .and_then(|attos| attos.checked_add(fraction_attos))
        .ok_or(AmountError::TooLarge)
}

/// Writes `attos` in the text form, honouring width and alignment flags.
fn write_attos(f: &mut fmt::Formatter<'_>, negative: bool, attos: u128) -> fmt::Result {
    let sign = if negative { "-" } else { "" };
    let whole = attos / ATTOS_PER_UNIT;
    let fraction = attos % ATTOS_PER_UNIT;
    if fraction == 0 {
        return f.pad(&format!("{sign}{whole}"));
    }
    let digits = format!("{fraction:018}");
    f.pad(&format!("{sign}{whole}.{}", digits.trim_end_matches('0')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_one_form() {
        let amount: Amount = "0012.50".parse().unwrap();
        assert_eq!(amount.to_string(), "12.5");
        assert_eq!(amount.attos(), 12_500_000_000_000_000_000);
        assert_eq!("0.000000000000000001".parse::<Amount>().unwrap().attos(), 1);
        assert_eq!("10000000000".parse::<Amount>().unwrap().to_string(), "10000000000");
    }

    #[test]
    fn rejects_bad_text_with_a_precise_error() {
        assert_eq!("-1".parse::<Amount>(), Err(AmountError::Negative));
        assert_eq!("-0.5".parse::<Amount>(), Err(AmountError::Negative));
        assert_eq!(
            "0.0000000000000000001".parse::<Amount>(),
            Err(AmountError::TooPrecise { digits: 19 })
        );
        assert_eq!("10000000000.000000000000000001".parse::<Amount>(), Err(AmountError::TooLarge));
        assert_eq!("99999999999999999999999999".parse::<Amount>(), Err(AmountError::TooLarge));
        for bad in ["", ".", "1.", ".5", "1e3", "+1", " 1", "1 ", "1,5", "0x10", "NaN", "١"] {
            assert!(matches!(bad.parse::<Amount>(), Err(AmountError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn decimals_convert_exactly() {
        let amount = Amount::try_from(Decimal::new(125, 3)).unwrap();
        assert_eq!(amount.to_string(), "0.125");
        assert_eq!(amount.to_decimal(), Decimal::new(125, 3));
        assert_eq!(Amount::try_from(Decimal::new(-1, 0)), Err(AmountError::Negative));
        assert_eq!(
            Amount::try_from(Decimal::new(1, 19)),
            Err(AmountError::TooPrecise { digits: 19 })
        );
        // Trailing zeros beyond the scale are not precision.
        assert_eq!(
            Amount::try_from(Decimal::new(1_000, 20)).unwrap().to_string(),
            "0.00000000000000001"
        );
        assert_eq!(Amount::try_from(Decimal::from(MAX_AMOUNT + 1)), Err(AmountError::TooLarge));
    }

    #[test]
    fn arithmetic_is_checked() {
        let max = Amount::from_units(MAX_AMOUNT).unwrap();
        let one = Amount::from_units(1).unwrap();
        assert_eq!(max.checked_add(one), Err(AmountError::TooLarge));
        assert_eq!(Amount::ZERO.checked_sub(one), Err(AmountError::Underflow));
        assert_eq!(one.checked_sub(one), Ok(Amount::ZERO));
        assert_eq!(Amount::from_units(MAX_AMOUNT + 1), Err(AmountError::TooLarge));
    }

    #[test]
    fn fees_round_down() {
        let amount = Amount::from_attos(999).unwrap();
        assert_eq!(amount.basis_points(250).attos(), 24); // 24.975 rounds down
        assert_eq!(amount.basis_points(10_000), amount);
        assert_eq!(amount.basis_points(0), Amount::ZERO);
    }

    #[test]
    fn cost_is_bytes_times_price() {
        let price: PricePerByte = "0.00000000005".parse().unwrap();
        assert_eq!(cost(1_000_000, price).unwrap().to_string(), "0.00005");
        assert_eq!(price.per_gib().to_string(), "0.0536870912");
        let dear = PricePerByte::from_attos(MAX_PRICE_ATTOS).unwrap();
        assert_eq!(cost(u64::MAX, dear), Err(AmountError::TooLarge));
        assert_eq!("1.5".parse::<PricePerByte>(), Err(AmountError::PriceTooLarge));
        assert_eq!(
            "99999999999999999999999999".parse::<PricePerByte>(),
            Err(AmountError::PriceTooLarge)
        );
    }

    #[test]
    fn serde_uses_the_text_form() {
        let amount: Amount = "1.25".parse().unwrap();
        assert_eq!(serde_json::to_string(&amount).unwrap(), "\"1.25\"");
        assert_eq!(serde_json::from_str::<Amount>("\"1.25\"").unwrap(), amount);
        assert!(serde_json::from_str::<Amount>("\"-1\"").is_err());
        assert!(serde_json::from_str::<Amount>("1.25").is_err());
    }

    #[test]
    fn display_honours_width() {
        assert_eq!(format!("{:>6}", "1.5".parse::<Amount>().unwrap()), "   1.5");
        assert_eq!(format!("{:<6}|", "-1.5".parse::<Balance>().unwrap()), "-1.5  |");
    }

    #[test]
    fn balances_are_signed() {
        let balance: Balance = "-12.50".parse().unwrap();
        assert_eq!(balance.to_string(), "-12.5");
        assert_eq!(balance.to_amount(), Err(AmountError::Negative));
        let one = Amount::from_units(1).unwrap();
        assert_eq!(Balance::ZERO.checked_sub(one).unwrap().to_string(), "-1");
        assert_eq!(Balance::from(one).checked_add(one).unwrap().to_amount(), Amount::from_units(2));
        assert_eq!(
            "10000000000000000000".parse::<Balance>().unwrap().to_string(),
            "10000000000000000000"
        );
        assert!("--1".parse::<Balance>().is_err());
    }

    proptest! {
        #[test]
        fn balance_text_round_trips(attos in any::<i64>(), scale in 0u32..6) {
            let balance = Balance { attos: i128::from(attos) * 10i128.pow(scale * 3) };
            prop_assert_eq!(balance.to_string().parse::<Balance>().unwrap(), balance);
        }

        #[test]
        fn text_round_trips(attos in 0..=MAX_ATTOS) {
            let amount = Amount::from_attos(attos).unwrap();
            prop_assert_eq!(amount.to_string().parse::<Amount>().unwrap(), amount);
        }

        #[test]
        fn decimal_round_trips(attos in 0..=MAX_ATTOS) {
            let amount = Amount::from_attos(attos).unwrap();
            prop_assert_eq!(Amount::try_from(amount.to_decimal()).unwrap(), amount);
            prop_assert_eq!(amount.to_decimal().to_string(), amount.to_string());
        }

        #[test]
        fn add_then_sub_is_identity(a in 0..=MAX_ATTOS / 2, b in 0..=MAX_ATTOS / 2) {
            let (a, b) = (Amount::from_attos(a).unwrap(), Amount::from_attos(b).unwrap());
            prop_assert_eq!(a.checked_add(b).unwrap().checked_sub(b).unwrap(), a);
        }

        #[test]
        fn fee_plus_rest_is_whole(attos in 0..=MAX_ATTOS, bps in 0u16..=10_000) {
            let amount = Amount::from_attos(attos).unwrap();
            let fee = amount.basis_points(bps);
            prop_assert!(fee <= amount);
            prop_assert_eq!(fee.checked_add(amount.checked_sub(fee).unwrap()).unwrap(), amount);
        }
    }
}
