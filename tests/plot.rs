//! PNG charts: the file decodes, has the stated size, and each series is
//! drawn in its own colour where its points lie.

use selective::plot::{render_png, write_png, Chart, Series};

fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    assert_eq!(info.color_type, png::ColorType::Rgb);
    (info.width, info.height, buf)
}

fn count_color(pixels: &[u8], color: [u8; 3]) -> usize {
    pixels.chunks(3).filter(|p| *p == color).count()
}

fn chart(series: Vec<Series>, log_x: bool) -> Chart {
    Chart {
        title: "loss".into(),
        x_label: "step".into(),
        y_label: "nats per token".into(),
        series,
        log_x,
    }
}

#[test]
fn two_series_are_drawn_in_two_colours() {
    let train = Series {
        name: "train".into(),
        points: (0..50)
            .map(|i| (i as f64, 4.0 / (1.0 + i as f64)))
            .collect(),
    };
    let val = Series {
        name: "val".into(),
        points: (0..5)
            .map(|i| (10.0 * i as f64, 4.5 / (1.0 + 10.0 * i as f64)))
            .collect(),
    };
    let (w, h, pixels) = decode(&render_png(&chart(vec![train, val.clone()], false)).unwrap());
    assert_eq!((w, h), (800, 500));
    let blue = count_color(&pixels, [31, 119, 180]);
    let orange = count_color(&pixels, [255, 127, 14]);
    assert!(blue > 500 && orange > 300, "blue {blue}, orange {orange}");

    // one series alone: no orange at all
    let (_, _, pixels) = decode(&render_png(&chart(vec![val], false)).unwrap());
    assert_eq!(count_color(&pixels, [255, 127, 14]), 0);
}

#[test]
fn a_rising_series_goes_from_bottom_left_to_top_right() {
    let s = Series {
        name: "acc".into(),
        points: vec![(64.0, 0.0), (1048576.0, 1.0)],
    };
    let (w, _, pixels) = decode(&render_png(&chart(vec![s], true)).unwrap());
    let w = w as usize;
    let blue: Vec<(usize, usize)> = pixels
        .chunks(3)
        .enumerate()
        .filter(|(_, p)| *p == [31, 119, 180])
        .map(|(i, _)| (i % w, i / w))
        .filter(|&(x, _)| x < 700) // leave out the legend's swatch
        .collect();
    let leftmost = blue.iter().min_by_key(|p| p.0).unwrap();
    let rightmost = blue.iter().max_by_key(|p| p.0).unwrap();
    assert!(leftmost.1 > rightmost.1 + 300, "{leftmost:?} {rightmost:?}");
}

#[test]
fn bad_charts_are_errors_and_files_are_written() {
    let s = Series {
        name: "x".into(),
        points: vec![(0.0, 1.0), (1.0, 2.0)],
    };
    let err = render_png(&chart(vec![s.clone()], true))
        .unwrap_err()
        .to_string();
    assert!(err.contains("logarithmic"), "{err}");
    let empty = Series {
        name: "nan".into(),
        points: vec![(1.0, f64::NAN)],
    };
    assert!(render_png(&chart(vec![empty], false))
        .unwrap_err()
        .to_string()
        .contains("no finite points"));

    let dir = std::env::temp_dir().join(format!("selective-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("loss.png");
    write_png(&chart(vec![s], false), &path).unwrap();
    let (w, h, _) = decode(&std::fs::read(&path).unwrap());
    assert_eq!((w, h), (800, 500));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes a sample chart for a person to look at:
/// `PLOT_SAMPLE=/tmp/sample.png cargo test --release --test plot -- sample`.
#[test]
fn sample() {
    let Ok(path) = std::env::var("PLOT_SAMPLE") else {
        return;
    };
    let train = Series {
        name: "train".into(),
        points: (1..2000)
            .map(|i| (i as f64, 1.4 + 3.0 / (i as f64).sqrt()))
            .collect(),
    };
    let val = Series {
        name: "validation".into(),
        points: (1..20)
            .map(|i| (100.0 * i as f64, 1.5 + 3.0 / (100.0 * i as f64).sqrt()))
            .collect(),
    };
    let mut c = chart(vec![train, val], false);
    c.title = "char-small on Tiny Shakespeare".into();
    write_png(&c, std::path::Path::new(&path)).unwrap();
}
