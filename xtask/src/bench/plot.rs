//! Grouped bar chart of a dataplane run (SVG, drawn with plotters): one
//! panel per pattern, hit-path servers on the top row, relays below.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::dataplane::{Results, PATTERNS};

const COLORS: [RGBColor; 4] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

pub fn svg(r: &Results, path: &Path) -> Result<()> {
    let area = SVGBackend::new(path, (1500, 760)).into_drawing_area();
    area.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (title, body) = area.split_vertically(40);
    title
        .draw(&Text::new(
            format!(
                "herd vs nbdkit vs qemu-nbd (fio nbd engine, loopback, {} MiB image, medians of {})",
                r.image_mib, r.reps
            ),
            (10, 10),
            ("sans-serif", 20),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    let rows = body.split_evenly((2, PATTERNS.len()));
    for (gi, group) in ["hit", "relay"].iter().enumerate() {
        let mut names: Vec<String> = Vec::new();
        for c in r.cells.iter().filter(|c| c.group == *group) {
            if !names.contains(&c.server) {
                names.push(c.server.clone());
            }
        }
        for (pi, p) in PATTERNS.iter().enumerate() {
            let panel = &rows[gi * PATTERNS.len() + pi];
            let vals: Vec<(String, f64, f64, f64)> = names
                .iter()
                .filter_map(|n| {
                    r.cells
                        .iter()
                        .find(|c| &c.server == n && c.pattern == p.name)
                        .map(|c| (n.clone(), c.median, c.min, c.max))
                })
                .collect();
            let top = vals.iter().map(|v| v.3).fold(1.0, f64::max) * 1.15;
            let unit = if p.iops { "IOPS" } else { "MiB/s" };
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{} {} ({unit})", group, p.name), ("sans-serif", 14))
                .margin(8)
                .x_label_area_size(8)
                .y_label_area_size(52)
                .build_cartesian_2d(0f64..vals.len().max(1) as f64, 0f64..top)
                .map_err(|e| anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .disable_x_axis()
                .y_labels(5)
                .y_label_formatter(&|v| format!("{v:.0}"))
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
            for (i, (name, med, lo, hi)) in vals.iter().enumerate() {
                let x = i as f64;
                let color = COLORS[i % COLORS.len()];
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x + 0.1, 0.0), (x + 0.9, *med)],
                        color.filled(),
                    )))
                    .map_err(|e| anyhow!("{e}"))?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                    });
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x + 0.5, *lo), (x + 0.5, *hi)],
                        BLACK,
                    )))
                    .map_err(|e| anyhow!("{e}"))?;
            }
            if pi == 0 {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .label_font(("sans-serif", 10))
                    .background_style(WHITE.mix(0.8))
                    .draw()
                    .map_err(|e| anyhow!("{e}"))?;
            }
        }
    }
    area.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
