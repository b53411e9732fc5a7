//! Line charts written as PNG files: training and validation loss curves,
//! accuracy curves of the synthetic tasks. A small rasteriser of our own
//! (lines, ticks, text from a built-in bitmap font) and the `png` crate for
//! the encoding, so that plotting needs no system fonts or libraries.

mod font;

use std::path::Path;

use crate::error::{invalid, Result};
use crate::io::write_atomically;

/// One named line of (x, y) points, drawn in the order given.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart: axes scaled to fit every finite point of every series.
#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// log10 scale on the x axis (all x must then be > 0)
    pub log_x: bool,
}

const WIDTH: usize = 800;
const HEIGHT: usize = 500;
const LEFT: usize = 80;
const RIGHT: usize = 20;
const TOP: usize = 40;
const BOTTOM: usize = 60;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];
/// Colours of successive series (matplotlib's first five).
const PALETTE: [Rgb; 5] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
];

/// An RGB image, row-major.
struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            pixels: WHITE.repeat(WIDTH * HEIGHT),
        }
    }

    fn set(&mut self, x: i64, y: i64, color: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < WIDTH && (y as usize) < HEIGHT {
            let i = 3 * (y as usize * WIDTH + x as usize);
            self.pixels[i..i + 3].copy_from_slice(&color);
        }
    }

    /// A line of the given thickness (Bresenham, with a square pen).
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), thickness: i64, color: Rgb) {
        let (mut x, mut y) = (x0.round() as i64, y0.round() as i64);
        let (xe, ye) = (x1.round() as i64, y1.round() as i64);
        let dx = (xe - x).abs();
        let dy = -(ye - y).abs();
        let sx = if x < xe { 1 } else { -1 };
        let sy = if y < ye { 1 } else { -1 };
        let mut err = dx + dy;
        let lo = -(thickness - 1) / 2;
        let hi = thickness / 2;
        loop {
            for oy in lo..=hi {
                for ox in lo..=hi {
                    self.set(x + ox, y + oy, color);
                }
            }
            if x == xe && y == ye {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at (x, y); characters outside printable
    /// ASCII are drawn as '?'.
    fn text(&mut self, x: i64, y: i64, text: &str, color: Rgb) {
        for (k, ch) in text.chars().enumerate() {
            let glyph = glyph(ch);
            let x0 = x + (k * font::GLYPH_WIDTH) as i64;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..font::GLYPH_WIDTH {
                    if bits >> col & 1 == 1 {
                        self.set(x0 + col as i64, y + row as i64, color);
                    }
                }
            }
        }
    }

    /// Text drawn bottom-to-top, its centre at (cx, cy).
    fn text_vertical(&mut self, cx: i64, cy: i64, text: &str, color: Rgb) {
        let len = text.chars().count() * font::GLYPH_WIDTH;
        for (k, ch) in text.chars().enumerate() {
            let glyph = glyph(ch);
            // glyph column c of character k goes to image row y0 - (k·W + c)
            let y0 = cy + len as i64 / 2;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..font::GLYPH_WIDTH {
                    if bits >> col & 1 == 1 {
                        let y = y0 - (k * font::GLYPH_WIDTH + col) as i64;
                        let x = cx - font::GLYPH_HEIGHT as i64 / 2 + row as i64;
                        self.set(x, y, color);
                    }
                }
            }
        }
    }
}

/// The bitmap of a character; outside printable ASCII, that of '?'.
fn glyph(ch: char) -> &'static [u16; font::GLYPH_HEIGHT] {
    let code = ch as u32;
    let index = if (32..127).contains(&code) {
        code - 32
    } else {
        '?' as u32 - 32
    };
    &font::GLYPHS[index as usize]
}

fn text_width(text: &str) -> i64 {
    (text.chars().count() * font::GLYPH_WIDTH) as i64
}

/// About `target` round tick values (1, 2 or 5 times a power of ten apart)
/// covering [lo, hi].
fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / target as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| span / s <= target as f64)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    // A step below 1 is 1, 2 or 5 times 10^-p, whose inverse is an integer:
    // k / that integer is the correctly rounded tick (k · 0.1 is not: 14 ·
    // 0.1 = 1.4000000000000001).
    let tick = |k: i64| {
        if step < 1.0 {
            k as f64 / (1.0 / step).round()
        } else {
            k as f64 * step
        }
    };
    (first..=last).map(tick).collect()
}

fn format_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.0e}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

fn validate(chart: &Chart) -> Result<(f64, f64, f64, f64)> {
    let mut x_range = (f64::INFINITY, f64::NEG_INFINITY);
    let mut y_range = (f64::INFINITY, f64::NEG_INFINITY);
    for s in &chart.series {
        for &(x, y) in &s.points {
            if !x.is_finite() || !y.is_finite() {
                continue;
            }
            if chart.log_x && x <= 0.0 {
                return Err(invalid(
                    "plot",
                    format!(
                        "plot '{}': series '{}' has x = {x}, but the x axis is logarithmic",
                        chart.title, s.name
                    ),
                ));
            }
            let x = if chart.log_x { x.log10() } else { x };
            x_range = (x_range.0.min(x), x_range.1.max(x));
            y_range = (y_range.0.min(y), y_range.1.max(y));
        }
    }
    if !x_range.0.is_finite() {
        return Err(invalid(
            "plot",
            format!("'{}': no finite points to draw", chart.title),
        ));
    }
    let pad = |(lo, hi): (f64, f64)| {
        if hi - lo < 1e-12 * lo.abs().max(1.0) {
            (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0))
        } else {
            (lo, hi)
        }
    };
    let (x0, x1) = pad(x_range);
    let (y0, y1) = pad(y_range);
    let margin = 0.04 * (y1 - y0);
    Ok((x0, x1, y0 - margin, y1 + margin))
}

/// Draws the chart and returns it as a PNG file's bytes.
pub fn render_png(chart: &Chart) -> Result<Vec<u8>> {
    let (x_lo, x_hi, y_lo, y_hi) = validate(chart)?;
    let mut canvas = Canvas::new();
    let plot_w = (WIDTH - LEFT - RIGHT) as f64;
    let plot_h = (HEIGHT - TOP - BOTTOM) as f64;
    let px = |x: f64| {
        let x = if chart.log_x { x.log10() } else { x };
        LEFT as f64 + (x - x_lo) / (x_hi - x_lo) * plot_w
    };
    let py = |y: f64| TOP as f64 + (y_hi - y) / (y_hi - y_lo) * plot_h;
    let (left, right) = (LEFT as f64, (WIDTH - RIGHT) as f64);
    let (top, bottom) = (TOP as f64, (HEIGHT - BOTTOM) as f64);

    // grid and tick labels
    for t in nice_ticks(y_lo, y_hi, 6) {
        let y = py(t);
        canvas.line((left, y), (right, y), 1, GRID);
        let label = format_tick(t);
        canvas.text(
            LEFT as i64 - 6 - text_width(&label),
            y as i64 - 8,
            &label,
            BLACK,
        );
    }
    let x_ticks: Vec<(f64, String)> = if chart.log_x {
        nice_ticks(x_lo, x_hi, 8)
            .into_iter()
            .filter(|t| t.fract() == 0.0)
            .map(|t| (10f64.powf(t), format!("1e{}", t as i64)))
            .collect()
    } else {
        nice_ticks(x_lo, x_hi, 8)
            .into_iter()
            .map(|t| (t, format_tick(t)))
            .collect()
    };
    for (t, label) in &x_ticks {
        let x = px(*t);
        canvas.line((x, top), (x, bottom), 1, GRID);
        canvas.text(
            x as i64 - text_width(label) / 2,
            bottom as i64 + 6,
            label,
            BLACK,
        );
    }

    // the series, then the frame over them
    for (k, s) in chart.series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        for w in points.windows(2) {
            canvas.line(w[0], w[1], 2, color);
        }
        if points.len() == 1 {
            canvas.line(points[0], points[0], 5, color);
        }
    }
    canvas.line((left, top), (right, top), 1, BLACK);
    canvas.line((left, bottom), (right, bottom), 1, BLACK);
    canvas.line((left, top), (left, bottom), 1, BLACK);
    canvas.line((right, top), (right, bottom), 1, BLACK);

    // title, axis labels, legend
    canvas.text(
        WIDTH as i64 / 2 - text_width(&chart.title) / 2,
        10,
        &chart.title,
        BLACK,
    );
    canvas.text(
        (LEFT as i64 + WIDTH as i64 - RIGHT as i64) / 2 - text_width(&chart.x_label) / 2,
        HEIGHT as i64 - 26,
        &chart.x_label,
        BLACK,
    );
    canvas.text_vertical(
        14,
        (TOP as i64 + HEIGHT as i64 - BOTTOM as i64) / 2,
        &chart.y_label,
        BLACK,
    );
    let legend_w = chart
        .series
        .iter()
        .map(|s| text_width(&s.name))
        .max()
        .unwrap_or(0)
        + 34;
    let (lx, ly) = (right as i64 - legend_w - 8, top as i64 + 8);
    for (k, s) in chart.series.iter().enumerate() {
        let y = ly + 18 * k as i64;
        let color = PALETTE[k % PALETTE.len()];
        canvas.line(
            ((lx + 4) as f64, (y + 8) as f64),
            ((lx + 24) as f64, (y + 8) as f64),
            3,
            color,
        );
        canvas.text(lx + 30, y, &s.name, BLACK);
    }

    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, WIDTH as u32, HEIGHT as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let encode_error = |e: png::EncodingError| {
            invalid("plot", format!("'{}': PNG encoding: {e}", chart.title))
        };
        let mut writer = encoder.write_header().map_err(encode_error)?;
        writer
            .write_image_data(&canvas.pixels)
            .map_err(encode_error)?;
    }
    Ok(bytes)
}

/// Draws the chart into a PNG file, written atomically.
pub fn write_png(chart: &Chart, path: &Path) -> Result<()> {
    let bytes = render_png(chart)?;
    write_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        assert_eq!(
            nice_ticks(1.37, 1.92, 6),
            vec![1.4, 1.5, 1.6, 1.7, 1.8, 1.9]
        );
        assert_eq!(format_tick(0.30000000000000004), "0.3");
        assert_eq!(format_tick(2000.0), "2000");
    }
}
