//! `--plot FILE.svg` and `secinfer plot`: one SVG with two panels drawn by
//! plotters from bench reports. Left, online throughput against online batch
//! size (log-log), secure (solid, filled dots) and plaintext tract (thin,
//! open dots), one colour per model; a report without a sweep contributes
//! its single batch size. Right, accuracy of the original model against the
//! secure one, per model.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::bench::BenchReport;

fn short_name(r: &BenchReport) -> String {
    Path::new(&r.model)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(&r.model)
        .to_string()
}

/// (batch, secure online/s, plaintext/s) points of a report.
fn points(r: &BenchReport) -> Vec<(f64, f64, f64)> {
    if r.sweep.is_empty() {
        vec![(
            r.batch as f64,
            r.online_predictions_per_s,
            r.plain_predictions_per_s,
        )]
    } else {
        r.sweep
            .iter()
            .map(|p| {
                (
                    p.batch as f64,
                    p.online_predictions_per_s,
                    p.plain_predictions_per_s,
                )
            })
            .collect()
    }
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

/// Writes the plot of `reports` to `path` (SVG).
pub fn write_svg(reports: &[BenchReport], path: &Path) -> anyhow::Result<()> {
    if reports.is_empty() {
        anyhow::bail!("nothing to plot: no reports");
    }
    let all: Vec<(f64, f64, f64)> = reports.iter().flat_map(points).collect();
    let positive = |v: f64| v.is_finite() && v > 0.0;
    let xs: Vec<f64> = all.iter().map(|p| p.0).filter(|&v| positive(v)).collect();
    let ys: Vec<f64> = all
        .iter()
        .flat_map(|p| [p.1, p.2])
        .filter(|&v| positive(v))
        .collect();
    if xs.is_empty() || ys.is_empty() {
        anyhow::bail!("nothing to plot: the reports have no positive throughput");
    }
    let fold = |v: &[f64], f: fn(f64, f64) -> f64, init: f64| v.iter().copied().fold(init, f);
    let (x0, x1) = (
        fold(&xs, f64::min, f64::MAX) / 2.0,
        fold(&xs, f64::max, 0.0) * 2.0,
    );
    let (y0, y1) = (
        fold(&ys, f64::min, f64::MAX) / 3.0,
        // two decades of headroom: the legend sits above the curves
        fold(&ys, f64::max, 0.0) * 100.0,
    );

    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(700);

    let mut chart = ChartBuilder::on(&left)
        .caption(
            "Online throughput vs batch size (2 cores)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("inferences per round trip")
        .y_desc("predictions / s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for (i, r) in reports.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let pts = points(r);
        let name = short_name(r);
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                colour.stroke_width(3),
            ))
            .map_err(err)?
            .label(format!("{name} secure"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(3)));
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, p.1), 4, colour.filled())),
            )
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.2)),
                colour.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("{name} plaintext tract"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(1)));
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, p.2), 4, colour.stroke_width(1))),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;

    // Accuracy: original (plaintext tract) vs secure, per model with labels.
    let acc: Vec<(String, f64, f64)> = reports
        .iter()
        .filter_map(|r| {
            Some((
                short_name(r),
                r.accuracy_plain? * 100.0,
                r.accuracy_secure? * 100.0,
            ))
        })
        .collect();
    let lowest = acc.iter().map(|a| a.1.min(a.2)).fold(100.0, f64::min);
    let floor = (lowest - 2.0).floor().max(0.0);
    // The top quarter stays free for the legend and the model names.
    let top = 100.0 + (100.0 - floor) * 0.3;
    let n = acc.len().max(1);
    let mut bars = ChartBuilder::on(&right)
        .caption("Accuracy: original vs secure", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(20)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..(3 * n) as f64, floor..top)
        .map_err(err)?;
    bars.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("test accuracy, %")
        .y_label_formatter(&|v| {
            if *v <= 100.0 {
                format!("{v:.1}")
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(err)?;
    let original = RGBColor(150, 150, 150);
    let secure = RGBColor(30, 90, 200);
    for (i, a) in acc.iter().enumerate() {
        let x = (3 * i) as f64;
        bars.draw_series([
            Rectangle::new([(x + 0.2, floor), (x + 1.0, a.1)], original.filled()),
            Rectangle::new([(x + 1.0, floor), (x + 1.8, a.2)], secure.filled()),
        ])
        .map_err(err)?;
        let label_at = a.1.max(a.2) + (100.0 - floor) * 0.06;
        bars.draw_series([
            Text::new(format!("{:.2}", a.1), (x + 0.25, a.1), ("sans-serif", 11)),
            Text::new(format!("{:.2}", a.2), (x + 1.05, a.2), ("sans-serif", 11)),
            Text::new(a.0.clone(), (x + 0.2, label_at), ("sans-serif", 12)),
        ])
        .map_err(err)?;
    }
    bars.draw_series([Rectangle::new(
        [(0.0, floor), (0.0, floor)],
        original.filled(),
    )])
    .map_err(err)?
    .label("original (tract f32)")
    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], original.filled()));
    bars.draw_series([Rectangle::new(
        [(0.0, floor), (0.0, floor)],
        secure.filled(),
    )])
    .map_err(err)?
    .label("secure")
    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], secure.filled()));
    bars.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
