//! The chart operators look at in an incident review: commits and errors per 100 ms
//! through each target around one change, with the change and the routing of the new
//! master marked.

use super::clients::{Outcome, Sample};
use super::report::Window;
use super::TARGETS;
use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;

const BUCKET: f64 = 0.1;
/// How much of the window after the change is drawn at most.
const SHOWN_AFTER: f64 = 12.0;

/// Per 100 ms bucket from `x0` to `x1` (seconds relative to `mark`): commits and errors
/// (failed connects and failed transactions) of `target`.
pub fn buckets(
    samples: &[Sample],
    target: usize,
    mark: f64,
    x0: f64,
    x1: f64,
) -> (Vec<f64>, Vec<f64>) {
    let n = ((x1 - x0) / BUCKET).ceil().max(0.0) as usize;
    let mut commits = vec![0.0; n];
    let mut errors = vec![0.0; n];
    for s in samples.iter().filter(|s| s.target == target) {
        let x = s.end - mark;
        if x < x0 || x >= x1 {
            continue;
        }
        let i = ((x - x0) / BUCKET) as usize;
        let Some(slot) = (match s.outcome {
            Outcome::Committed(_) => commits.get_mut(i),
            Outcome::ConnectFailed(_) | Outcome::TxnFailed(_) => errors.get_mut(i),
            Outcome::Connected => None,
        }) else {
            continue;
        };
        *slot += 1.0;
    }
    (commits, errors)
}

pub fn draw(
    path: &Path,
    scenario: &str,
    index: usize,
    w: Window,
    routed_at: Option<f64>,
    moves: &[(f64, String)],
    samples: &[Sample],
) -> Result<()> {
    let x0 = w.from - w.mark;
    let x1 = (w.to - w.mark).min(SHOWN_AFTER);
    let series: Vec<(Vec<f64>, Vec<f64>)> = (0..TARGETS.len())
        .map(|t| buckets(samples, t, w.mark, x0, x1))
        .collect();
    let ymax = series
        .iter()
        .flat_map(|(c, e)| c.iter().chain(e))
        .fold(1.0_f64, |m, v| m.max(*v))
        * 1.15;
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let what = if scenario == "switchover" {
        "stolonctl switchover"
    } else {
        "kill -9 master keeper + PostgreSQL"
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{scenario} #{index}: commits and errors per 100 ms ({what} at 0)"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(x0..x1, 0.0..ymax)
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds from the change")
        .y_desc("per 100 ms")
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    let colours = [
        (RGBColor(31, 119, 180), RGBColor(23, 190, 207)),
        (RGBColor(214, 39, 40), RGBColor(255, 127, 14)),
    ];
    for ((name, lines), colour) in TARGETS.iter().zip(&series).zip(colours) {
        draw_target(&mut chart, name, x0, lines, colour)?;
    }
    let mut marks = vec![(0.0, what.to_string())];
    if let Some(r) = routed_at {
        marks.push((
            r - w.mark,
            "new master routed (as the load generator saw it)".into(),
        ));
    }
    marks.extend(moves.iter().cloned());
    draw_marks(&mut chart, &marks, ymax)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// One target's commits (thick) and errors (thin) per bucket, from `x0`.
fn draw_target(
    chart: &mut Chart<'_, '_>,
    name: &str,
    x0: f64,
    (commits, errors): &(Vec<f64>, Vec<f64>),
    (c_col, e_col): (RGBColor, RGBColor),
) -> Result<()> {
    let at = |i: usize| x0 + i as f64 * BUCKET;
    chart
        .draw_series(LineSeries::new(
            commits.iter().enumerate().map(|(i, v)| (at(i), *v)),
            c_col.stroke_width(2),
        ))
        .map_err(|e| anyhow!("{e:?}"))?
        .label(format!("{name}: commits"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c_col.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            errors.iter().enumerate().map(|(i, v)| (at(i), *v)),
            e_col.stroke_width(1),
        ))
        .map_err(|e| anyhow!("{e:?}"))?
        .label(format!("{name}: errors (failed connects + failed txns)"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], e_col.stroke_width(1)));
    Ok(())
}

/// The marks of stolon-proxy's session moves (times from the change): the first session
/// moved, and when the last drained session was moved or closed, with the counts.
pub fn move_marks(seen: &[super::cluster::MovesSeen]) -> Vec<(f64, String)> {
    let mut marks = Vec::new();
    if let Some(first) = seen.iter().find(|s| s.moved > 0) {
        marks.push((first.at, "first session moved".to_string()));
    }
    if let Some(last) = seen.last() {
        marks.push((
            last.at,
            format!(
                "{} sessions moved, {} closed at their boundary",
                last.moved, last.closed
            ),
        ));
    }
    marks
}

/// A labelled vertical line at each step; labels step down so that close ones stay legible.
fn draw_marks(chart: &mut Chart<'_, '_>, marks: &[(f64, String)], ymax: f64) -> Result<()> {
    for (i, (x, label)) in marks.iter().enumerate() {
        let y = ymax * (0.97 - 0.06 * i as f64);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(*x, 0.0), (*x, ymax)],
                BLACK.stroke_width(1),
            )))
            .map_err(|e| anyhow!("{e:?}"))?;
        chart
            .draw_series(std::iter::once(Text::new(
                label.clone(),
                (x + 0.05, y),
                ("sans-serif", 13),
            )))
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::clients::Kind;

    #[test]
    fn samples_fall_in_their_100ms_bucket_by_end_time() {
        let s = |target, end, outcome| Sample {
            target,
            kind: Kind::PerTxn,
            start: end - 0.01,
            end,
            outcome,
        };
        let samples = vec![
            s(0, 10.05, Outcome::Committed(1)),
            s(0, 10.06, Outcome::Committed(2)),
            s(0, 10.15, Outcome::TxnFailed("57P01".into())),
            s(0, 10.16, Outcome::Connected),
            s(1, 10.05, Outcome::Committed(3)),
            s(0, 20.0, Outcome::Committed(4)),
        ];
        let (c, e) = buckets(&samples, 0, 10.0, 0.0, 0.3);
        assert_eq!(c, vec![2.0, 0.0, 0.0]);
        assert_eq!(e, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn move_marks_show_the_first_move_and_the_last_change_with_its_counts() {
        use crate::ha::cluster::MovesSeen;
        let m = |at, moved, closed| MovesSeen { at, moved, closed };
        assert!(move_marks(&[]).is_empty(), "no drained session, no mark");
        let marks = move_marks(&[m(0.4, 0, 1), m(0.7, 3, 1), m(0.9, 4, 1)]);
        assert_eq!(
            marks,
            vec![
                (0.7, "first session moved".to_string()),
                (
                    0.9,
                    "4 sessions moved, 1 closed at their boundary".to_string()
                ),
            ]
        );
        // Only closes (moves off): the last close is marked.
        assert_eq!(
            move_marks(&[m(0.5, 0, 4)]),
            vec![(
                0.5,
                "0 sessions moved, 4 closed at their boundary".to_string()
            )]
        );
    }
}
