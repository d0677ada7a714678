//! The storm's charts (SVG, plotters): boot-time CDF per baseline, makespan
//! and root-egress bars, and VMs booted over time.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::Results;

const COLORS: [RGBColor; 5] = [
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
];

fn e<E: std::fmt::Display>(x: E) -> anyhow::Error {
    anyhow!("{x}")
}

fn title(r: &Results) -> String {
    format!(
        "{} hosts x {} VMs, {} links, fanout {}, working set {:.1} MiB",
        r.hosts,
        r.vms_per_host,
        r.link,
        r.fanout,
        r.working_set_bytes as f64 / 1_048_576.0
    )
}

/// Writes cdf.svg, bars.svg and timeline.svg into `dir`.
pub fn svgs(r: &Results, dir: &Path) -> Result<()> {
    cdf(r, &dir.join("cdf.svg"), false)?;
    cdf(r, &dir.join("timeline.svg"), true)?;
    bars(r, &dir.join("bars.svg"))
}

/// Fraction (or count, for the timeline) of VMs booted by time t.
fn cdf(r: &Results, path: &Path, counts: bool) -> Result<()> {
    let area = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    area.fill(&WHITE).map_err(e)?;
    let xmax = r
        .baselines
        .iter()
        .filter_map(|b| b.boot_secs.last().copied())
        .fold(r.lower_bound_secs, f64::max)
        * 1.05;
    let ymax = if counts {
        r.baselines.iter().map(|b| b.vms).max().unwrap_or(1) as f64
    } else {
        1.0
    };
    let caption = if counts {
        format!("VMs booted over time: {}", title(r))
    } else {
        format!("Boot time CDF: {}", title(r))
    };
    let mut chart = ChartBuilder::on(&area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax.max(1.0), 0f64..ymax * 1.02)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the storm started")
        .y_desc(if counts {
            "VMs booted"
        } else {
            "fraction of VMs booted"
        })
        .draw()
        .map_err(e)?;
    for (i, b) in r.baselines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let n = b.boot_secs.len().max(1) as f64;
        // A step function: nothing booted until the first VM is.
        let mut pts = vec![(0.0, 0.0)];
        for (k, t) in b.boot_secs.iter().enumerate() {
            pts.push((*t, pts.last().map_or(0.0, |p| p.1)));
            let y = if counts {
                (k + 1) as f64
            } else {
                (k + 1) as f64 / n
            };
            pts.push((*t, y));
        }
        let label = if b.hosts < r.hosts {
            format!("{} ({} hosts)", b.name, b.hosts)
        } else {
            b.name.clone()
        };
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    let lb = r.lower_bound_secs;
    chart
        .draw_series(LineSeries::new(
            vec![(lb, 0.0), (lb, ymax)],
            BLACK.stroke_width(1),
        ))
        .map_err(e)?
        .label(format!("lower bound {lb:.1} s"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(1)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(e)?;
    area.present().map_err(e)
}

fn bars(r: &Results, path: &Path) -> Result<()> {
    let area = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    area.fill(&WHITE).map_err(e)?;
    let (head, body) = area.split_vertically(36);
    head.draw(&Text::new(title(r), (10, 8), ("sans-serif", 16)))
        .map_err(e)?;
    let panels = body.split_evenly((1, 2));
    let makespans: Vec<f64> = r
        .baselines
        .iter()
        .map(|b| b.extrapolated_makespan_secs.unwrap_or(b.makespan_secs))
        .collect();
    let egress: Vec<f64> = r
        .baselines
        .iter()
        .map(|b| b.root_egress_bytes as f64 / 1_048_576.0)
        .collect();
    // Makespans span orders of magnitude (full copy at 100 hosts): log axis.
    {
        let top = makespans.iter().copied().fold(10.0, f64::max) * 2.0;
        let mut chart = ChartBuilder::on(&panels[0])
            .caption(
                format!("makespan at {} hosts (s, log; * extrapolated)", r.hosts),
                ("sans-serif", 14),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..makespans.len().max(1) as f64, (1f64..top).log_scale())
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .draw()
            .map_err(e)?;
        for (i, (b, v)) in r.baselines.iter().zip(&makespans).enumerate() {
            let x = i as f64;
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x + 0.1, 1.0), (x + 0.9, v.max(1.0))],
                    color.filled(),
                )))
                .map_err(e)?;
            let mark = if b.extrapolated_makespan_secs.is_some() {
                "*"
            } else {
                ""
            };
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{}{mark}: {v:.0}", b.name),
                    (x + 0.1, v.max(1.0) * 1.15),
                    ("sans-serif", 11),
                )))
                .map_err(e)?;
        }
    }
    {
        let top = egress.iter().copied().fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(&panels[1])
            .caption("root egress, measured (MiB)", ("sans-serif", 14))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..egress.len().max(1) as f64, 0f64..top)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .draw()
            .map_err(e)?;
        for (i, (b, v)) in r.baselines.iter().zip(&egress).enumerate() {
            let x = i as f64;
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x + 0.1, 0.0), (x + 0.9, *v)],
                    color.filled(),
                )))
                .map_err(e)?;
            let hosts = if b.hosts < r.hosts {
                format!(" ({} hosts)", b.hosts)
            } else {
                String::new()
            };
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{}{hosts}: {v:.0}", b.name),
                    (x + 0.1, v + top * 0.02),
                    ("sans-serif", 11),
                )))
                .map_err(e)?;
        }
    }
    area.present().map_err(e)
}
