//! Progress on stderr for the CLI's long jobs. On a terminal, an indicatif bar. Where
//! stderr is not one (a log file, CI, `nohup`), indicatif draws nothing, and a carve or
//! adaptive gating's measurement would run for half an hour without a word, so a plain
//! line is written instead: once the job has run [`PLAIN_EVERY`], then at most that often,
//! and at its end; and while one step takes minutes (a pass of adaptive gating's
//! measurement), the same line again every [`PLAIN_HEARTBEAT`], so a log shows the job is
//! alive. Short jobs (loading a model) stay quiet.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a plain progress line is written where stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(15);

/// How often a plain line is repeated while the job's position does not move.
pub const PLAIN_HEARTBEAT: Duration = Duration::from_secs(60);

/// A progress bar, or plain lines where stderr is not a terminal. Same calls as
/// indicatif's `ProgressBar` (all through `&self`, so closures can share it).
pub struct Progress {
    bar: ProgressBar,
    plain: Option<Arc<Mutex<Plain>>>,
    /// Tells the heartbeat thread (plain lines only) to end.
    done: Arc<AtomicBool>,
}

struct Plain {
    label: String,
    started: Instant,
    printed: Option<Instant>,
    /// Position and message of the last line written, so the end does not repeat it.
    last: Option<(u64, String)>,
    pos: u64,
    len: u64,
    msg: String,
    /// Where a resumed job started (see [`Progress::set_position`]) and when: the time
    /// left is estimated from the work this run did.
    resumed: Option<(u64, Instant)>,
}

impl Progress {
    /// `template` is indicatif's; its text before `{bar` names the job in plain lines.
    pub fn new(len: u64, template: &str) -> Progress {
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let plain = (!std::io::stderr().is_terminal()).then(|| {
            Arc::new(Mutex::new(Plain {
                label: label_of(template),
                started: Instant::now(),
                printed: None,
                last: None,
                pos: 0,
                len,
                msg: String::new(),
                resumed: None,
            }))
        });
        let done = Arc::new(AtomicBool::new(false));
        if let Some(plain) = &plain {
            let (plain, done) = (Arc::clone(plain), Arc::clone(&done));
            std::thread::spawn(move || heartbeat(&plain, &done));
        }
        Progress { bar, plain, done }
    }

    pub fn set_length(&self, len: u64) {
        self.bar.set_length(len);
        self.update(|p| p.len = len, false);
    }

    /// Moves the bar; only here may a plain line be written, so a caller sets the length
    /// and message first. A first position past 1 is work done before this run (a
    /// measurement resumed from its last pass): the time left is then estimated from what
    /// this run does, not from that jump.
    pub fn set_position(&self, pos: u64) {
        let resumed = pos > 1 && self.bar.position() == 0;
        self.bar.set_position(pos);
        if resumed {
            self.bar.reset_eta();
        }
        self.update(
            |p| {
                if resumed {
                    p.resumed = Some((pos, Instant::now()));
                }
                p.pos = pos;
            },
            true,
        );
    }

    pub fn set_message(&self, msg: String) {
        self.bar.set_message(msg.clone());
        self.update(|p| p.msg = msg, false);
    }

    /// Clears the bar; a plain job long enough to have spoken gets its last line.
    pub fn finish_and_clear(&self) {
        self.done.store(true, Ordering::Relaxed);
        self.bar.finish_and_clear();
        let Some(Ok(p)) = self.plain.as_deref().map(Mutex::lock) else {
            return;
        };
        if let Some(line) = p.end_line(Instant::now()) {
            eprintln!("{line}");
        }
    }

    fn update(&self, change: impl FnOnce(&mut Plain), may_print: bool) {
        let Some(plain) = &self.plain else {
            return;
        };
        let Ok(mut p) = plain.lock() else {
            return;
        };
        change(&mut p);
        let now = Instant::now();
        if may_print && due(p.started, p.printed, now) {
            p.say(now);
        }
    }
}

impl Plain {
    /// Writes the line now, and remembers when and what it said.
    fn say(&mut self, now: Instant) {
        self.printed = Some(now);
        self.last = Some((self.pos, self.msg.clone()));
        eprintln!("{}", self.line(now));
    }

    /// The job's last line: for a job long enough to have spoken, unless the line before
    /// already said the same.
    fn end_line(&self, now: Instant) -> Option<String> {
        let repeat =
            (self.last.as_ref()).is_some_and(|(pos, msg)| *pos == self.pos && *msg == self.msg);
        let spoke = self.printed.is_some() || due(self.started, None, now);
        (spoke && !repeat).then(|| self.line(now))
    }

    fn line(&self, now: Instant) -> String {
        let secs = now.duration_since(self.started).as_secs();
        // A job whose size is not known yet (set at its first step) says only its name.
        let mut s = match self.len {
            0 => self.label.clone(),
            len => format!("{} {}/{}", self.label, self.pos, len),
        };
        if !self.msg.is_empty() {
            s += &format!(" ({})", self.msg);
        }
        s += &format!(", {}:{:02} elapsed", secs / 60, secs % 60);
        let (done, secs_run) = match self.resumed {
            Some((from, at)) => (
                self.pos - from.min(self.pos),
                now.duration_since(at).as_secs(),
            ),
            None => (self.pos, secs),
        };
        if done > 0 && self.pos < self.len {
            let left = secs_run as f64 * (self.len - self.pos) as f64 / done as f64;
            s += &format!(", about {:.0} min left", (left / 60.0).ceil());
        }
        s
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Repeats the last plain line while a step runs long, until the job is done.
fn heartbeat(plain: &Mutex<Plain>, done: &AtomicBool) {
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        let Ok(mut p) = plain.lock() else {
            return;
        };
        let now = Instant::now();
        if !done.load(Ordering::Relaxed) && quiet_too_long(p.started, p.printed, now) {
            p.say(now);
        }
    }
}

/// Whether a job has said nothing for [`PLAIN_HEARTBEAT`] (since its start, or its last
/// line).
fn quiet_too_long(started: Instant, printed: Option<Instant>, now: Instant) -> bool {
    now.duration_since(printed.unwrap_or(started)) >= PLAIN_HEARTBEAT
}

/// Whether a plain line is due: never before [`PLAIN_EVERY`] of running, then when the
/// last line is that old (the end's line comes from `finish_and_clear`, after the last
/// message).
fn due(started: Instant, printed: Option<Instant>, now: Instant) -> bool {
    now.duration_since(started) >= PLAIN_EVERY
        && printed.is_none_or(|t| now.duration_since(t) >= PLAIN_EVERY)
}

/// The words before the bar: "measuring layer sensitivity {bar:40} ..." names the job
/// "measuring layer sensitivity".
fn label_of(template: &str) -> String {
    let head = template.split('{').next().unwrap_or_default().trim();
    match head.is_empty() {
        true => "working".into(),
        false => head.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_wait_for_a_long_job_then_come_at_most_every_interval() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // A job that ends quickly says nothing.
        assert!(!due(t0, None, at(2)));
        // A long one speaks once it has run the interval...
        assert!(due(t0, None, at(15)));
        // ...then not again until the interval has passed since that line.
        assert!(!due(t0, Some(at(15)), at(20)));
        assert!(due(t0, Some(at(15)), at(30)));
        // A step that takes minutes: the heartbeat repeats the line once a minute.
        assert!(!quiet_too_long(t0, None, at(59)));
        assert!(quiet_too_long(t0, None, at(60)));
        assert!(!quiet_too_long(t0, Some(at(100)), at(130)));
        assert!(quiet_too_long(t0, Some(at(100)), at(160)));
    }

    #[test]
    fn a_plain_line_names_the_job_and_says_how_long_is_left() {
        assert_eq!(
            label_of("measuring layer sensitivity {bar:40} {pos}/{len} passes"),
            "measuring layer sensitivity"
        );
        assert_eq!(label_of("{spinner}"), "working");
        let t0 = Instant::now();
        let p = Plain {
            label: "scoring".into(),
            started: t0,
            printed: None,
            last: None,
            pos: 5,
            len: 20,
            msg: "16.7750".into(),
            resumed: None,
        };
        assert_eq!(
            p.line(t0 + Duration::from_secs(300)),
            "scoring 5/20 (16.7750), 5:00 elapsed, about 15 min left"
        );
        // Resumed at 12 of 32: two passes in ten minutes leave about 90.
        let p = Plain {
            label: "measuring".into(),
            pos: 14,
            len: 32,
            msg: String::new(),
            resumed: Some((12, t0)),
            ..p
        };
        assert_eq!(
            p.line(t0 + Duration::from_secs(600)),
            "measuring 14/32, 10:00 elapsed, about 90 min left"
        );
        // Just resumed: nothing done this run yet, so no estimate.
        let p = Plain { pos: 12, ..p };
        assert_eq!(
            p.line(t0 + Duration::from_secs(20)),
            "measuring 12/32, 0:20 elapsed"
        );
        // Before its first step a job may not know its size: no "0/0".
        let unsized_job = Plain {
            len: 0,
            pos: 0,
            last: None,
            printed: None,
            resumed: None,
            label: "scoring".into(),
            msg: String::new(),
            started: t0,
        };
        assert_eq!(
            unsized_job.line(t0 + Duration::from_secs(60)),
            "scoring, 1:00 elapsed"
        );
        // The end repeats nothing: a last line that said 12/32 already is not written again.
        let said = Plain {
            printed: Some(t0),
            last: Some((12, String::new())),
            ..p
        };
        assert_eq!(said.end_line(t0 + Duration::from_secs(600)), None);
        let moved = Plain { pos: 13, ..said };
        assert!(moved.end_line(t0 + Duration::from_secs(600)).is_some());
    }
}
