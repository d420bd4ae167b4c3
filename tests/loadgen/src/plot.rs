//! The README's plot: grouped bars of msgs/s per server CPU, one group per workload, drawn
//! with plotters into an SVG.

use std::path::Path;

use plotters::prelude::*;

const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
];

/// `values[workload][server]`, in messages per second per server CPU.
pub fn bars(
    out: &Path,
    workloads: &[&str],
    servers: &[&str],
    values: &[Vec<f64>],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(out, (960, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = values
        .iter()
        .flatten()
        .copied()
        .fold(0.0_f64, f64::max)
        .max(1.0)
        / 1000.0;
    let groups = workloads.len();
    let per = servers.len() as f64 + 1.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Echo: thousand messages/s per server CPU (median of interleaved rounds)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..groups as f64 * per, 0.0..max * 1.1)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("k msgs/s per CPU")
        .draw()?;
    for (si, server) in servers.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(wi, row)| {
                let x0 = wi as f64 * per + si as f64 + 0.5;
                Rectangle::new([(x0, 0.0), (x0 + 0.9, row[si] / 1000.0)], color.filled())
            }))?
            .label(*server)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    for (wi, name) in workloads.iter().enumerate() {
        let x = wi as f64 * per + per / 2.0 - 0.5;
        chart.draw_series(std::iter::once(Text::new(
            name.to_string(),
            (x - 1.2, -max * 0.04),
            ("sans-serif", 14),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
