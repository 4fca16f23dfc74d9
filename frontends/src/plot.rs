//! Training curves as a PNG: a loss panel and an accuracy panel, training in blue and
//! validation in orange, with a small built-in bitmap font for titles and axis values.

use std::path::Path;

const W: usize = 900;
const H: usize = 360;
const BLUE: [u8; 3] = [31, 119, 180];
const ORANGE: [u8; 3] = [255, 127, 14];
const GRID: [u8; 3] = [225, 225, 225];
const AXIS: [u8; 3] = [60, 60, 60];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x.round() as i64 + dx, y.round() as i64 + dy, c);
                }
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        let mut cx = x;
        for ch in s.chars() {
            if let Some(rows) = glyph(ch) {
                for (r, bits) in rows.iter().enumerate() {
                    for (k, b) in bits.bytes().enumerate() {
                        if b == b'#' {
                            self.set(cx + k as i64, y + r as i64, c);
                        }
                    }
                }
            }
            cx += 6;
        }
    }
}

/// 5×7 glyphs for the characters the plot writes.
fn glyph(c: char) -> Option<[&'static str; 7]> {
    Some(match c {
        '0' => [
            " ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### ",
        ],
        '1' => [
            "  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### ",
        ],
        '2' => [
            " ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####",
        ],
        '3' => [
            "#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### ",
        ],
        '4' => [
            "   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # ",
        ],
        '5' => [
            "#####", "#    ", "#### ", "    #", "    #", "#   #", " ### ",
        ],
        '6' => [
            "  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### ",
        ],
        '7' => [
            "#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   ",
        ],
        '8' => [
            " ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### ",
        ],
        '9' => [
            " ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  ",
        ],
        '.' => [
            "     ", "     ", "     ", "     ", "     ", " ##  ", " ##  ",
        ],
        'a' => [
            "     ", "     ", " ### ", "    #", " ####", "#   #", " ####",
        ],
        'c' => [
            "     ", "     ", " ### ", "#    ", "#    ", "#   #", " ### ",
        ],
        'e' => [
            "     ", "     ", " ### ", "#   #", "#####", "#    ", " ### ",
        ],
        'h' => [
            "#    ", "#    ", "# ## ", "##  #", "#   #", "#   #", "#   #",
        ],
        'i' => [
            "  #  ", "     ", " ##  ", "  #  ", "  #  ", "  #  ", " ### ",
        ],
        'l' => [
            " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### ",
        ],
        'n' => [
            "     ", "     ", "# ## ", "##  #", "#   #", "#   #", "#   #",
        ],
        'o' => [
            "     ", "     ", " ### ", "#   #", "#   #", "#   #", " ### ",
        ],
        'p' => [
            "     ", "     ", "#### ", "#   #", "#### ", "#    ", "#    ",
        ],
        'r' => [
            "     ", "     ", "# ## ", "##  #", "#    ", "#    ", "#    ",
        ],
        's' => [
            "     ", "     ", " ####", "#    ", " ### ", "    #", "#### ",
        ],
        't' => [
            " #   ", " #   ", "###  ", " #   ", " #   ", " #  #", "  ## ",
        ],
        'u' => [
            "     ", "     ", "#   #", "#   #", "#   #", "#  ##", " ## #",
        ],
        'v' => [
            "     ", "     ", "#   #", "#   #", "#   #", " # # ", "  #  ",
        ],
        'y' => [
            "     ", "     ", "#   #", "#   #", " ####", "    #", " ### ",
        ],
        '_' => [
            "     ", "     ", "     ", "     ", "     ", "     ", "#####",
        ],
        ' ' => ["     "; 7],
        _ => return None,
    })
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// One panel: series (values per epoch) drawn in the box at `x0`.
fn panel(c: &mut Canvas, x0: i64, title: &str, series: &[(&[f64], [u8; 3])]) {
    let (left, top, w, h) = (x0 + 50, 40i64, 360i64, 260i64);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(s, _)| s.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let (mut lo, mut hi) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let n = series
        .iter()
        .map(|(s, _)| s.len())
        .max()
        .unwrap_or(1)
        .max(2);
    for k in 0..=4 {
        let y = top + h - (h * k) / 4;
        c.line(
            (left as f64, y as f64),
            ((left + w) as f64, y as f64),
            GRID,
            1,
        );
        let v = lo + (hi - lo) * k as f64 / 4.0;
        c.text(x0 + 2, y - 3, &fmt_tick(v), AXIS);
    }
    c.line(
        (left as f64, top as f64),
        (left as f64, (top + h) as f64),
        AXIS,
        1,
    );
    c.line(
        (left as f64, (top + h) as f64),
        ((left + w) as f64, (top + h) as f64),
        AXIS,
        1,
    );
    for (k, _) in (0..n).enumerate() {
        let x = left + (w * k as i64) / (n as i64 - 1);
        c.text(x - 2, top + h + 6, &(k + 1).to_string(), AXIS);
    }
    c.text(left + w / 2 - 15, top + h + 20, "epoch", AXIS);
    c.text(left + w / 2 - 3 * title.len() as i64, 15, title, AXIS);
    for (s, color) in series {
        let pt = |k: usize, v: f64| {
            (
                (left + (w * k as i64) / (n as i64 - 1)) as f64,
                (top + h) as f64 - (v - lo) / (hi - lo) * h as f64,
            )
        };
        for k in 1..s.len() {
            c.line(pt(k - 1, s[k - 1]), pt(k, s[k]), *color, 2);
        }
        if s.len() == 1 {
            let (x, y) = pt(0, s[0]);
            c.line((x - 2.0, y), (x + 2.0, y), *color, 3);
        }
    }
    // Legend.
    c.line(
        ((left + w - 90) as f64, 52.0),
        ((left + w - 75) as f64, 52.0),
        BLUE,
        2,
    );
    c.text(left + w - 70, 49, "train", AXIS);
    c.line(
        ((left + w - 90) as f64, 66.0),
        ((left + w - 75) as f64, 66.0),
        ORANGE,
        2,
    );
    c.text(left + w - 70, 63, "val", AXIS);
}

/// Writes the loss and accuracy curves of a training run as a PNG.
pub fn training_curves(
    path: &Path,
    loss: &[f64],
    val_loss: &[f64],
    acc: &[f64],
    val_acc: &[f64],
) -> Result<(), String> {
    let mut c = Canvas::new();
    panel(&mut c, 0, "loss", &[(loss, BLUE), (val_loss, ORANGE)]);
    panel(&mut c, 450, "accuracy", &[(acc, BLUE), (val_acc, ORANGE)]);
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    w.write_image_data(&c.px)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}
