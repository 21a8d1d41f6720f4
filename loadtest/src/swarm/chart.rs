//! The Scale chart: the store's idle load (left) and what a master change costs (right)
//! against the number of proxies, one point per size of the run.

use super::report::{Change, Result_, Step};
use crate::ha::report::percentile;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// A named series of (proxies, value) points.
type Series = (&'static str, Vec<(f64, f64)>, RGBColor);

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);

fn median(changes: &[Change], scenario: &str, f: fn(&Change) -> f64) -> Option<f64> {
    let v: Vec<f64> = (changes.iter())
        .filter(|c| c.scenario == scenario && !c.frozen_proxy)
        .map(f)
        .collect();
    (!v.is_empty()).then(|| percentile(&v, 50.0))
}

pub fn draw(path: &Path, r: &Result_) -> Result<()> {
    let n = |s: &Step| s.proxies as f64;
    let load: Vec<Series> = vec![
        (
            "etcd raft proposals/s (writes)",
            r.steps
                .iter()
                .map(|s| (n(s), s.idle.etcd_proposals_per_s))
                .collect(),
            BLUE,
        ),
        (
            "etcd lease renewals/s",
            (r.steps.iter())
                .map(|s| (n(s), s.idle.etcd_lease_renewals_per_s))
                .collect(),
            ORANGE,
        ),
        (
            "etcd watch events sent/s",
            (r.steps.iter())
                .map(|s| (n(s), s.idle.etcd_watch_events_per_s))
                .collect(),
            GREEN,
        ),
        (
            "etcd CPU %",
            r.steps
                .iter()
                .map(|s| (n(s), s.idle.etcd_cpu_percent))
                .collect(),
            RED,
        ),
    ];
    let point = |scenario: &'static str, f: fn(&Change) -> f64| -> Vec<(f64, f64)> {
        (r.steps.iter())
            .filter_map(|s| median(&s.changes, scenario, f).map(|v| (n(s), v)))
            .collect()
    };
    let times: Vec<Series> = vec![
        (
            "switchover: longest no-commit gap (s)",
            point("switchover", |c| c.max_gap_s),
            BLUE,
        ),
        (
            "failover: longest no-commit gap (s)",
            point("failover", |c| c.max_gap_s),
            RED,
        ),
        (
            "switchover: routing write to last proxy, p99 (s)",
            point("switchover", |c| c.propagation_ms_p99 / 1000.0),
            GREEN,
        ),
    ];
    let root = SVGBackend::new(path, (1300, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let (left, right) = root.split_horizontally(650);
    panel(
        &left,
        "idle, no master change: store load",
        "per second / %",
        &load,
    )?;
    panel(
        &right,
        "one master change, what writers saw",
        "seconds",
        &times,
    )?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<()> {
    let xmax = (series.iter())
        .flat_map(|(_, p, _)| p.iter().map(|(x, _)| *x))
        .fold(1.0_f64, f64::max)
        * 1.05;
    let ymax = (series.iter())
        .flat_map(|(_, p, _)| p.iter().map(|(_, y)| *y))
        .fold(0.1_f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("proxies")
        .y_desc(y_desc)
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    for (name, points, colour) in series {
        let colour = *colour;
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(|e| anyhow!("{e:?}"))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}
