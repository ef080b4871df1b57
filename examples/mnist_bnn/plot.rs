//! The training curves as a PNG: running training loss on the left, running training accuracy
//! and per-epoch test accuracy (with the batch norms' running statistics as trained and, when
//! measured, re-estimated) in the middle, both against (fractional) epochs; with a binary
//! optimizer, a third panel on the right: the running mean flip ratio (the fraction of binary
//! weights whose sign a step flipped), on a log scale.
//!
//! Text is drawn with a font compiled into the binary (Ubuntu Light from
//! `epaint_default_fonts`), so the plot needs no system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

/// One point of the running training curves, taken every few steps.
#[derive(Debug, Clone, Copy)]
pub struct TrainPoint {
    /// Fractional epoch, e.g. 1.5 halfway through the second epoch.
    pub epoch: f64,
    /// Mean loss over the epoch so far.
    pub loss: f64,
    /// Accuracy over the epoch so far, in percent.
    pub acc: f64,
    /// Mean flip ratio per step over the epoch so far (with a binary optimizer).
    pub flip_ratio: Option<f64>,
}

const FONT: &str = "sans-serif";

fn register_font() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        )
        .map_err(|_| "the embedded plot font is unreadable".to_string());
    });
    result
}

/// Draws the curves into `path` (PNG, 1200x480, or 1800x480 with the flip-ratio panel).
pub fn draw(
    path: &Path,
    train: &[TrainPoint],
    test: &[(f64, f64)],
    test_precise: &[(f64, f64)],
) -> Result<(), String> {
    register_font()?;
    let err = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    let flips: Vec<(f64, f64)> =
        train.iter().filter_map(|p| p.flip_ratio.map(|f| (p.epoch, f))).collect();
    let width = if flips.is_empty() { 1200 } else { 1800 };
    let root = BitMapBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, rest) = root.split_horizontally(600);
    let (right, flip_area) = rest.split_horizontally(600);

    let max_epoch = train.iter().map(|p| p.epoch).fold(1.0f64, f64::max).ceil();
    let max_loss = train.iter().map(|p| p.loss).fold(0.0f64, f64::max).max(0.1) * 1.05;
    let min_acc = train
        .iter()
        .map(|p| p.acc)
        .chain(test.iter().chain(test_precise).map(|t| t.1))
        .fold(100.0f64, f64::min)
        .clamp(0.0, 90.0);
    let min_acc = (min_acc / 5.0).floor() * 5.0;

    let mut loss_chart = ChartBuilder::on(&left)
        .caption("training loss (running mean per epoch)", (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_epoch, 0.0..max_loss)
        .map_err(|e| err(&e))?;
    loss_chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("cross-entropy")
        .label_style((FONT, 15))
        .draw()
        .map_err(|e| err(&e))?;
    loss_chart
        .draw_series(LineSeries::new(train.iter().map(|p| (p.epoch, p.loss)), RED.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    loss_chart
        .configure_series_labels()
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    let mut acc_chart = ChartBuilder::on(&right)
        .caption("accuracy (%)", (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_epoch, min_acc..100.0)
        .map_err(|e| err(&e))?;
    acc_chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("accuracy (%)")
        .label_style((FONT, 15))
        .draw()
        .map_err(|e| err(&e))?;
    acc_chart
        .draw_series(LineSeries::new(train.iter().map(|p| (p.epoch, p.acc)), BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("train (running)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    let green = RGBColor(0, 150, 0);
    let purple = RGBColor(150, 0, 170);
    for (points, color, what) in [
        (test, green, "test, running BN statistics"),
        (test_precise, purple, "test, precise BN statistics"),
    ] {
        let Some(&(_, last)) = points.last() else {
            continue;
        };
        // The final value goes into the legend: per-point labels of two close curves collide.
        acc_chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("{what} (last {last:.2})"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
        acc_chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled())))
            .map_err(|e| err(&e))?;
    }
    acc_chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    if !flips.is_empty() {
        // A log scale: the ratio falls by orders of magnitude as training settles. Zero (no
        // flip at all) is drawn at the bottom of the axis.
        let positive = flips.iter().map(|f| f.1).filter(|f| *f > 0.0);
        let low = positive.clone().fold(1.0f64, f64::min).max(1e-9) / 2.0;
        let high = (positive.fold(low, f64::max) * 2.0).min(1.0).max(low * 10.0);
        let mut flip_chart = ChartBuilder::on(&flip_area)
            .caption("flip ratio (running mean per epoch)", (FONT, 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(0.0..max_epoch, (low..high).log_scale())
            .map_err(|e| err(&e))?;
        flip_chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("weights flipped per step")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style((FONT, 15))
            .draw()
            .map_err(|e| err(&e))?;
        let orange = RGBColor(220, 120, 0);
        flip_chart
            .draw_series(LineSeries::new(
                flips.iter().map(|&(x, f)| (x, f.max(low))),
                orange.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
    }

    root.present().map_err(|e| err(&e))?;
    Ok(())
}
