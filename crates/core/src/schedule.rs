//! Time-based pool bounds: recurring windows (`days: Mon-Fri`, `between: "09:00-17:00"`,
//! `timezone: Europe/Berlin`) that override a pool's min/max nodes while they are active.
//! Windows that end before they start (`22:00-06:00`) run overnight into the next day.

use std::time::SystemTime;

use jiff::{Timestamp, civil::Weekday, tz::TimeZone};

/// A parsed, valid schedule window.
#[derive(Debug, Clone)]
pub struct Window {
    /// Name, for reasons.
    pub name: String,
    /// Active days (index 0 = Monday).
    days: [bool; 7],
    /// Minutes after midnight.
    start: u16,
    /// Minutes after midnight (exclusive); `<= start` means overnight.
    end: u16,
    tz: TimeZone,
    /// Time zone name as given.
    pub timezone: String,
    /// Override of minNodes while active.
    pub min_nodes: Option<u32>,
    /// Override of maxNodes while active.
    pub max_nodes: Option<u32>,
}

/// Equal when written the same (the time zone by the name it was given as).
impl PartialEq for Window {
    fn eq(&self, other: &Window) -> bool {
        (
            &self.name,
            self.days,
            self.start,
            self.end,
            &self.timezone,
            self.min_nodes,
            self.max_nodes,
        ) == (
            &other.name,
            other.days,
            other.start,
            other.end,
            &other.timezone,
            other.min_nodes,
            other.max_nodes,
        )
    }
}

const DAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// `Mon` or `Monday` (any case) → 0.
fn day_index(name: &str) -> Option<usize> {
    let lower = name.to_ascii_lowercase();
    DAYS.iter()
        .position(|full| lower == full[..3] || lower == *full)
}

/// Parses `Mon-Fri`, `Sat,Sun`, `Mon,Wed-Fri`, `*` (every day).
pub fn parse_days(spec: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    if spec.trim() == "*" {
        return Ok([true; 7]);
    }
    for part in spec.split(',').map(str::trim) {
        let bad = || format!("{part:?} is not a day or range of days (e.g. Mon-Fri, Sat,Sun)");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (
                    day_index(a.trim()).ok_or_else(bad)?,
                    day_index(b.trim()).ok_or_else(bad)?,
                );
                let mut i = a;
                loop {
                    days[i] = true;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => days[day_index(part).ok_or_else(bad)?] = true,
        }
    }
    if !days.iter().any(|d| *d) {
        return Err("names no day".into());
    }
    Ok(days)
}

fn parse_clock(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    if h == 24 && m == 0 {
        return Some(24 * 60);
    }
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// Parses `09:00-17:00` into minutes after midnight.
pub fn parse_between(spec: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{spec:?} is not a time range (e.g. \"09:00-17:00\")");
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (start, end) = (
        parse_clock(a).ok_or_else(bad)?,
        parse_clock(b).ok_or_else(bad)?,
    );
    if start == end {
        return Err(format!("{spec:?} is empty (start equals end)"));
    }
    Ok((start, end))
}

/// Looks up an IANA time zone.
pub fn parse_timezone(name: &str) -> Result<TimeZone, String> {
    if name.is_empty() {
        return Ok(TimeZone::UTC);
    }
    TimeZone::get(name)
        .map_err(|_| format!("{name:?} is not a known IANA time zone (e.g. Europe/Berlin, UTC)"))
}

fn weekday_index(w: Weekday) -> usize {
    w.to_monday_zero_offset() as usize
}

impl Window {
    /// A window from its parts; `Err` lists each bad part as (field, reason).
    pub fn parse(
        name: &str,
        days: &str,
        between: &str,
        timezone: &str,
        min_nodes: Option<u32>,
        max_nodes: Option<u32>,
    ) -> Result<Window, Vec<(&'static str, String)>> {
        let mut errors = Vec::new();
        let days = parse_days(days).map_err(|e| errors.push(("days", e))).ok();
        let between = parse_between(between)
            .map_err(|e| errors.push(("between", e)))
            .ok();
        let tz = parse_timezone(timezone)
            .map_err(|e| errors.push(("timezone", e)))
            .ok();
        match (days, between, tz) {
            (Some(days), Some((start, end)), Some(tz)) if errors.is_empty() => Ok(Window {
                name: name.to_string(),
                days,
                start,
                end,
                tz,
                timezone: timezone.to_string(),
                min_nodes,
                max_nodes,
            }),
            _ => Err(errors),
        }
    }

    /// Whether the window is active at `at`.
    pub fn is_active(&self, at: SystemTime) -> bool {
        let Ok(ts) = Timestamp::try_from(at) else {
            return false;
        };
        let local = ts.to_zoned(self.tz.clone());
        let minute = (local.hour() as u16) * 60 + local.minute() as u16;
        let today = weekday_index(local.weekday());
        let yesterday = (today + 6) % 7;
        if self.start < self.end {
            self.days[today] && minute >= self.start && minute < self.end
        } else {
            (self.days[today] && minute >= self.start)
                || (self.days[yesterday] && minute < self.end)
        }
    }

    /// Whether this window and `other` are ever active at the same moment (checked minute by
    /// minute over a week, in each window's own time zone).
    pub fn overlaps(&self, other: &Window) -> bool {
        // Monday 2026-01-05 00:00 UTC; a week either side covers every zone offset.
        let base = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_767_571_200);
        (0..(14 * 24 * 60)).any(|m| {
            let at = base + std::time::Duration::from_secs(m * 60);
            self.is_active(at) && other.is_active(at)
        })
    }
}

/// The (min, max) bounds at `at`: the first active window's overrides, else the pool's.
pub fn bounds_at(
    windows: &[Window],
    min_nodes: u32,
    max_nodes: u32,
    at: SystemTime,
) -> (u32, u32, Option<&Window>) {
    match windows.iter().find(|w| w.is_active(at)) {
        Some(w) => (
            w.min_nodes.unwrap_or(min_nodes),
            w.max_nodes.unwrap_or(max_nodes),
            Some(w),
        ),
        None => (min_nodes, max_nodes, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        let ts: Timestamp = rfc3339.parse().expect("timestamp");
        SystemTime::from(ts)
    }

    #[test]
    fn business_hours_in_berlin() {
        let w = Window::parse(
            "business-hours",
            "Mon-Fri",
            "09:00-17:00",
            "Europe/Berlin",
            Some(5),
            None,
        )
        .expect("valid");
        // 2026-03-04 is a Wednesday; Berlin is UTC+1 in March.
        assert!(w.is_active(at("2026-03-04T08:30:00Z")), "09:30 in Berlin");
        assert!(!w.is_active(at("2026-03-04T07:30:00Z")), "08:30 in Berlin");
        assert!(!w.is_active(at("2026-03-04T16:00:00Z")), "17:00 is the end");
        assert!(!w.is_active(at("2026-03-07T10:00:00Z")), "Saturday");
        let (min, max, active) =
            bounds_at(std::slice::from_ref(&w), 2, 10, at("2026-03-04T10:00:00Z"));
        assert_eq!((min, max), (5, 10));
        assert_eq!(active.map(|w| w.name.as_str()), Some("business-hours"));
        assert_eq!(bounds_at(&[w], 2, 10, at("2026-03-04T20:00:00Z")).0, 2);
    }

    #[test]
    fn overnight_windows_and_day_lists() {
        let w =
            Window::parse("night", "Fri", "22:00-06:00", "UTC", Some(0), Some(2)).expect("valid");
        assert!(w.is_active(at("2026-03-06T23:00:00Z")), "Friday night");
        assert!(
            w.is_active(at("2026-03-07T05:59:00Z")),
            "early Saturday belongs to Friday"
        );
        assert!(
            !w.is_active(at("2026-03-07T23:00:00Z")),
            "Saturday night is not listed"
        );
        assert_eq!(
            parse_days("Mon,Wed-Fri").expect("days"),
            [true, false, true, true, true, false, false]
        );
        assert_eq!(
            parse_days("Sat-Mon").expect("wraps"),
            [true, false, false, false, false, true, true]
        );
        assert!(parse_days("Funday").is_err());
        assert!(parse_between("9-17").is_err());
        assert!(parse_between("09:00-09:00").is_err());
    }

    #[test]
    fn errors_name_each_bad_part_and_overlaps_are_found() {
        let errors = Window::parse("x", "Mon-Xyz", "25:00-26:00", "Mars/Olympus", None, None)
            .expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, ["days", "between", "timezone"]);
        let day =
            Window::parse("day", "Mon-Fri", "09:00-17:00", "UTC", Some(3), None).expect("valid");
        let lunch =
            Window::parse("lunch", "Wed", "12:00-13:00", "UTC", Some(4), None).expect("valid");
        let night =
            Window::parse("night", "Mon-Fri", "18:00-06:00", "UTC", Some(1), None).expect("valid");
        let berlin = Window::parse("berlin", "Mon", "17:30-18:30", "Europe/Berlin", None, None)
            .expect("valid");
        assert!(day.overlaps(&lunch));
        assert!(!day.overlaps(&night));
        assert!(
            berlin.overlaps(&day),
            "17:30 Berlin is 16:30 UTC in January"
        );
    }
}
