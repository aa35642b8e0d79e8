//! What the worker's and the agent's configurations share: every number a service reads is
//! bounded, so that a typo or an overflowing value is an error naming the key instead of a
//! panic deep inside (a semaphore past its permit limit, an `Instant` past its range) or a
//! resource the machine cannot give.

use std::ops::RangeInclusive;

/// Checks each `(key, value, allowed)`; the first value outside its range is the error.
pub fn check_ranges(settings: &[(&str, u64, RangeInclusive<u64>)]) -> Result<(), String> {
    match settings
        .iter()
        .find(|(_, value, allowed)| !allowed.contains(value))
    {
        Some((key, value, allowed)) => Err(format!(
            "{key} = {value} is outside {}..={}",
            allowed.start(),
            allowed.end()
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_value_out_of_range_is_named() {
        assert_eq!(check_ranges(&[("a", 3, 1..=4), ("b", 0, 0..=0)]), Ok(()));
        assert_eq!(
            check_ranges(&[("a", 3, 1..=4), ("b", u64::MAX, 1..=10), ("c", 0, 1..=1)]),
            Err(format!("b = {} is outside 1..=10", u64::MAX))
        );
    }
}
