//! IDX data sets in MNIST's layout: a directory with `train-images-idx3-ubyte`,
//! `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each raw or
//! gzip'ed (the same name with `.gz`).
//!
//! Every file is checked against its own header before anything trusts it: the magic number
//! (`0x00000803`, unsigned bytes in 3 dimensions, for images; `0x00000801` for labels), nonzero
//! dimensions, and a length that is exactly the header plus the data it announces. Across files,
//! the image and label counts of each split agree, both splits have the same image size, and
//! every label is below the number of classes. A problem is an [`IdxError`] naming the file.
//!
//! The parser reads through [`Read`] with the announced length as an upper bound, so a header
//! that claims gigabytes in a short file costs no more memory than the file itself.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

/// Magic number of an IDX file of unsigned bytes in 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes in 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The four files, in the order their bytes enter [`IdxSet::identity`].
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
/// Training labels.
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
/// Test images.
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
/// Test labels.
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";
/// All four names.
pub const FILE_NAMES: [&str; 4] = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS];

/// Labels are single bytes, so no data set has more classes than this.
pub const MAX_CLASSES: u32 = 256;

/// What is wrong with an IDX data set.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    /// Neither the raw file nor its `.gz` exists.
    #[error("{}: no `{name}` (or `{name}.gz`)", dir.display())]
    Missing { dir: PathBuf, name: &'static str },
    /// Both exist: which one is meant is not clear, and they may differ.
    #[error("{}: both `{name}` and `{name}.gz` exist; keep one", dir.display())]
    Ambiguous { dir: PathBuf, name: &'static str },
    /// The file (or its gzip stream) could not be read.
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// Shorter than its header.
    #[error("{}: {len} bytes, shorter than the {header}-byte IDX header", path.display())]
    TruncatedHeader { path: PathBuf, len: usize, header: usize },
    /// Not the kind of IDX file expected.
    #[error("{}: magic number {found:#010x}, expected {expected:#010x} ({what})", path.display())]
    WrongMagic { path: PathBuf, found: u32, expected: u32, what: &'static str },
    /// A dimension of zero.
    #[error("{}: the header gives {what} 0", path.display())]
    Empty { path: PathBuf, what: &'static str },
    /// The header announces more bytes than a file can hold here.
    #[error("{}: the header's dimensions {dims:?} do not fit in memory", path.display())]
    TooLarge { path: PathBuf, dims: Vec<u32> },
    /// The data after the header is shorter than the header announces.
    #[error("{}: truncated: the header announces {expected} bytes of data, the file holds {found}", path.display())]
    Truncated { path: PathBuf, expected: u64, found: u64 },
    /// Bytes after the data the header announces.
    #[error("{}: bytes after the {expected} bytes of data the header announces", path.display())]
    TrailingBytes { path: PathBuf, expected: u64 },
    /// A split's image and label counts differ.
    #[error("{} holds {images} images but {} holds {labels} labels", images_path.display(), labels_path.display())]
    CountMismatch { images_path: PathBuf, images: u32, labels_path: PathBuf, labels: u32 },
    /// The two splits' images differ in size.
    #[error("{} holds {train_rows}x{train_cols} images but {} holds {test_rows}x{test_cols}", train_path.display(), test_path.display())]
    SizeMismatch {
        train_path: PathBuf,
        train_rows: u32,
        train_cols: u32,
        test_path: PathBuf,
        test_rows: u32,
        test_cols: u32,
    },
    /// A label at or above the number of classes.
    #[error("{}: label {label} at index {index} is not below the number of classes, {classes}", path.display())]
    LabelOutOfRange { path: PathBuf, index: usize, label: u8, classes: u32 },
    /// Fewer than two classes: nothing to learn.
    #[error("{}: every label is {label}, so there is only one class; pass `--classes N` if the data set has more", path.display())]
    OneClass { path: PathBuf, label: u8 },
}

/// An images file: `count` images of `rows` x `cols` unsigned bytes, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    /// Number of images.
    pub count: u32,
    /// Rows per image.
    pub rows: u32,
    /// Columns per image.
    pub cols: u32,
    /// `count * rows * cols` pixels.
    pub pixels: Vec<u8>,
}

/// A labels file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    /// One class index per image.
    pub values: Vec<u8>,
}

/// The four files of a data set, checked against each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxSet {
    /// Training images.
    pub train_images: Images,
    /// Training labels, as many as images.
    pub train_labels: Labels,
    /// Test images, the same size as the training images.
    pub test_images: Images,
    /// Test labels, as many as images.
    pub test_labels: Labels,
    /// Number of classes: every label is below it.
    pub classes: u32,
    /// FNV-1a 64 of the four files' decoded bytes (headers included), in [`FILE_NAMES`] order:
    /// the same data, raw or gzip'ed, has the same identity.
    pub identity: u64,
}

/// Reads and checks the data set in `dir`. `classes` is the number of classes, or `None` for
/// the largest label in either split plus one.
pub fn read_dir(dir: &Path, classes: Option<u32>) -> Result<IdxSet, IdxError> {
    let mut hash = Fnv1a::new();
    let mut bytes =
        |name: &'static str, header_len: usize| -> Result<(PathBuf, Vec<u8>), IdxError> {
            let (path, reader) = open(dir, name)?;
            let data = read_checked(&path, reader, header_len)?;
            hash.update(&data);
            Ok((path, data))
        };
    let (path, data) = bytes(TRAIN_IMAGES, IMAGES_HEADER)?;
    let train_images = images_from_bytes(path, data);
    let (path, data) = bytes(TRAIN_LABELS, LABELS_HEADER)?;
    let train_labels = labels_from_bytes(path, data);
    let (path, data) = bytes(TEST_IMAGES, IMAGES_HEADER)?;
    let test_images = images_from_bytes(path, data);
    let (path, data) = bytes(TEST_LABELS, LABELS_HEADER)?;
    let test_labels = labels_from_bytes(path, data);
    let identity = hash.finish();

    for (images, labels) in [(&train_images, &train_labels), (&test_images, &test_labels)] {
        if images.count as usize != labels.values.len() {
            return Err(IdxError::CountMismatch {
                images_path: images.path.clone(),
                images: images.count,
                labels_path: labels.path.clone(),
                labels: labels.values.len() as u32,
            });
        }
    }
    if (train_images.rows, train_images.cols) != (test_images.rows, test_images.cols) {
        return Err(IdxError::SizeMismatch {
            train_path: train_images.path.clone(),
            train_rows: train_images.rows,
            train_cols: train_images.cols,
            test_path: test_images.path.clone(),
            test_rows: test_images.rows,
            test_cols: test_images.cols,
        });
    }
    let classes = match classes {
        Some(n) => n,
        None => {
            // Both label files are nonempty (checked by their headers).
            let max = |l: &Labels| l.values.iter().copied().max().unwrap_or(0);
            let top = max(&train_labels).max(max(&test_labels));
            if top == 0 {
                return Err(IdxError::OneClass { path: train_labels.path.clone(), label: 0 });
            }
            u32::from(top) + 1
        }
    };
    for labels in [&train_labels, &test_labels] {
        if let Some((index, &label)) =
            labels.values.iter().enumerate().find(|(_, &l)| u32::from(l) >= classes)
        {
            return Err(IdxError::LabelOutOfRange {
                path: labels.path.clone(),
                index,
                label,
                classes,
            });
        }
    }
    Ok(IdxSet { train_images, train_labels, test_images, test_labels, classes, identity })
}

const IMAGES_HEADER: usize = 16;
const LABELS_HEADER: usize = 8;

/// Opens `dir/name` or `dir/name.gz` (decompressing), whichever exists.
fn open(dir: &Path, name: &'static str) -> Result<(PathBuf, Box<dyn Read>), IdxError> {
    let raw = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    let (path, gzipped) = match (raw.exists(), gz.exists()) {
        (true, true) => return Err(IdxError::Ambiguous { dir: dir.to_path_buf(), name }),
        (false, false) => return Err(IdxError::Missing { dir: dir.to_path_buf(), name }),
        (true, false) => (raw, false),
        (false, true) => (gz, true),
    };
    let file = File::open(&path).map_err(|source| IdxError::Read { path: path.clone(), source })?;
    let file = BufReader::new(file);
    let reader: Box<dyn Read> =
        if gzipped { Box::new(MultiGzDecoder::new(file)) } else { Box::new(file) };
    Ok((path, reader))
}

/// The whole file, after checking that its length is exactly what its header announces.
/// `header_len` is 16 for images (magic, count, rows, cols) and 8 for labels (magic, count).
pub fn read_checked(
    path: &Path,
    reader: impl Read,
    header_len: usize,
) -> Result<Vec<u8>, IdxError> {
    let read_err = |source| IdxError::Read { path: path.to_path_buf(), source };
    let mut reader = reader;
    let mut data = Vec::new();
    (&mut reader).take(header_len as u64).read_to_end(&mut data).map_err(read_err)?;
    if data.len() < header_len {
        return Err(IdxError::TruncatedHeader {
            path: path.to_path_buf(),
            len: data.len(),
            header: header_len,
        });
    }
    let (magic, what) = if header_len == IMAGES_HEADER {
        (IMAGES_MAGIC, "IDX images: unsigned bytes in 3 dimensions")
    } else {
        (LABELS_MAGIC, "IDX labels: unsigned bytes in 1 dimension")
    };
    let found = be_u32(&data, 0);
    if found != magic {
        return Err(IdxError::WrongMagic {
            path: path.to_path_buf(),
            found,
            expected: magic,
            what,
        });
    }
    let dims: Vec<u32> = (4..header_len).step_by(4).map(|at| be_u32(&data, at)).collect();
    let names = ["the count", "rows", "columns"];
    if let Some(i) = dims.iter().position(|&d| d == 0) {
        return Err(IdxError::Empty { path: path.to_path_buf(), what: names[i] });
    }
    // The tensors index with i64; anything beyond that could never be loaded.
    let expected = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(u64::from(d)))
        .filter(|&n| n <= i64::MAX as u64 && usize::try_from(n).is_ok())
        .ok_or_else(|| IdxError::TooLarge { path: path.to_path_buf(), dims: dims.clone() })?;
    // `take` bounds the read by the announced size, so memory grows only with real bytes.
    (&mut reader).take(expected).read_to_end(&mut data).map_err(read_err)?;
    let found = (data.len() - header_len) as u64;
    if found < expected {
        return Err(IdxError::Truncated { path: path.to_path_buf(), expected, found });
    }
    let mut extra = [0u8; 1];
    let more = loop {
        match reader.read(&mut extra) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        }
    };
    if more > 0 {
        return Err(IdxError::TrailingBytes { path: path.to_path_buf(), expected });
    }
    Ok(data)
}

/// An images file's checked bytes (from [`read_checked`] with a 16-byte header).
fn images_from_bytes(path: PathBuf, mut data: Vec<u8>) -> Images {
    let (count, rows, cols) = (be_u32(&data, 4), be_u32(&data, 8), be_u32(&data, 12));
    data.drain(..IMAGES_HEADER);
    Images { path, count, rows, cols, pixels: data }
}

/// A labels file's checked bytes (from [`read_checked`] with an 8-byte header).
fn labels_from_bytes(path: PathBuf, mut data: Vec<u8>) -> Labels {
    data.drain(..LABELS_HEADER);
    Labels { path, values: data }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// FNV-1a, 64 bits (<http://www.isthe.com/chongo/tech/comp/fnv/>): a fingerprint of the data,
/// not a defence against someone forging a collision.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Fnv1a {
    /// The offset basis.
    pub fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    /// Hashes `bytes` into the state.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The hash so far.
    pub fn finish(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;

    fn images_file(count: u32, rows: u32, cols: u32, pixels: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [IMAGES_MAGIC, count, rows, cols] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v.extend((0..pixels).map(|i| i as u8));
        v
    }

    fn labels_file(labels: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
        v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        v.extend_from_slice(labels);
        v
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// A fresh directory holding a valid 5-train, 3-test, 4x3-pixel, 3-class data set.
    struct Fixture(PathBuf);

    impl Fixture {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("caseopt-idx-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let f = Fixture(dir);
            f.write(TRAIN_IMAGES, &images_file(5, 4, 3, 60));
            f.write(TRAIN_LABELS, &labels_file(&[0, 1, 2, 1, 0]));
            f.write(TEST_IMAGES, &images_file(3, 4, 3, 36));
            f.write(TEST_LABELS, &labels_file(&[2, 0, 1]));
            f
        }

        fn write(&self, name: &str, bytes: &[u8]) {
            fs::write(self.0.join(name), bytes).unwrap();
        }

        fn read(&self, classes: Option<u32>) -> Result<IdxSet, IdxError> {
            read_dir(&self.0, classes)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_a_valid_set_and_derives_the_classes() {
        let f = Fixture::new("valid");
        let set = f.read(None).unwrap();
        assert_eq!(
            (set.train_images.count, set.train_images.rows, set.train_images.cols),
            (5, 4, 3)
        );
        assert_eq!(set.train_images.pixels.len(), 60);
        assert_eq!(set.test_labels.values, [2, 0, 1]);
        assert_eq!(set.classes, 3);
        assert_eq!(f.read(Some(10)).unwrap().classes, 10);
    }

    #[test]
    fn gzip_files_read_like_raw_ones_with_the_same_identity() {
        let f = Fixture::new("gzip");
        let raw = f.read(None).unwrap();
        for name in [TRAIN_IMAGES, TEST_LABELS] {
            let bytes = fs::read(f.0.join(name)).unwrap();
            fs::remove_file(f.0.join(name)).unwrap();
            f.write(&format!("{name}.gz"), &gzip(&bytes));
        }
        let gz = f.read(None).unwrap();
        assert_eq!(gz.identity, raw.identity);
        assert_eq!(gz.train_images.pixels, raw.train_images.pixels);
        assert!(gz.train_images.path.ends_with("train-images-idx3-ubyte.gz"));

        // Both forms at once is ambiguous.
        f.write(TEST_LABELS, &labels_file(&[2, 0, 1]));
        let e = f.read(None).unwrap_err();
        assert!(matches!(e, IdxError::Ambiguous { name: TEST_LABELS, .. }), "{e}");

        // A damaged gzip stream is a read error naming the .gz file.
        fs::remove_file(f.0.join(TEST_LABELS)).unwrap();
        let mut bad = gzip(&labels_file(&[2, 0, 1]));
        bad.truncate(bad.len() - 12);
        f.write(&format!("{TEST_LABELS}.gz"), &bad);
        let e = f.read(None).unwrap_err();
        assert!(e.to_string().contains("t10k-labels-idx1-ubyte.gz"), "{e}");
        assert!(matches!(e, IdxError::Read { .. } | IdxError::Truncated { .. }), "{e}");
    }

    #[test]
    fn identity_changes_with_any_byte() {
        let f = Fixture::new("identity");
        let before = f.read(None).unwrap().identity;
        f.write(TEST_LABELS, &labels_file(&[2, 1, 1]));
        assert_ne!(f.read(None).unwrap().identity, before);
    }

    #[test]
    fn missing_file() {
        let f = Fixture::new("missing");
        fs::remove_file(f.0.join(TRAIN_LABELS)).unwrap();
        let e = f.read(None).unwrap_err();
        assert!(matches!(e, IdxError::Missing { name: TRAIN_LABELS, .. }), "{e}");
    }

    #[test]
    fn truncated_header_and_data() {
        let f = Fixture::new("truncated");
        f.write(TRAIN_IMAGES, &images_file(5, 4, 3, 60)[..10]);
        let e = f.read(None).unwrap_err();
        assert!(matches!(e, IdxError::TruncatedHeader { len: 10, header: 16, .. }), "{e}");
        assert!(e.to_string().contains(TRAIN_IMAGES), "{e}");

        f.write(TRAIN_IMAGES, &images_file(5, 4, 3, 59));
        let e = f.read(None).unwrap_err();
        assert!(matches!(e, IdxError::Truncated { expected: 60, found: 59, .. }), "{e}");

        // A header announcing far more than the file holds is the same error, without trying to
        // allocate what it announces.
        f.write(TRAIN_IMAGES, &images_file(u32::MAX, 1 << 16, 1 << 16, 60));
        let e = f.read(None).unwrap_err();
        assert!(matches!(e, IdxError::TooLarge { .. } | IdxError::Truncated { .. }), "{e}");
        f.write(TRAIN_IMAGES, &images_file(1 << 20, 1 << 10, 1 << 10, 60));
        let e = f.read(None).unwrap_err();
        assert!(
            matches!(e, IdxError::Truncated { found: 60, .. } | IdxError::TooLarge { .. }),
            "{e}"
        );
    }

    #[test]
    fn trailing_bytes() {
        let f = Fixture::new("trailing");
        let mut bytes = labels_file(&[2, 0, 1]);
        bytes.push(0);
        f.write(TEST_LABELS, &bytes);
        let e = f.read(None).unwrap_err();
        assert!(matches!(e, IdxError::TrailingBytes { expected: 3, .. }), "{e}");
    }

    #[test]
    fn wrong_magic() {
        let f = Fixture::new("magic");
        // Labels where images belong.
        f.write(TEST_IMAGES, &labels_file(&[0; 16]));
        let e = f.read(None).unwrap_err();
        assert!(
            matches!(e, IdxError::WrongMagic { found: LABELS_MAGIC, expected: IMAGES_MAGIC, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("0x00000801") && e.to_string().contains(TEST_IMAGES), "{e}");
    }

    #[test]
    fn zero_dimension() {
        let f = Fixture::new("zero");
        f.write(TRAIN_IMAGES, &images_file(5, 0, 3, 0));
        let e = f.read(None).unwrap_err();
        assert!(matches!(e, IdxError::Empty { what: "rows", .. }), "{e}");
    }

    #[test]
    fn counts_that_disagree() {
        let f = Fixture::new("counts");
        f.write(TRAIN_LABELS, &labels_file(&[0, 1, 2, 1]));
        let e = f.read(None).unwrap_err();
        assert!(matches!(e, IdxError::CountMismatch { images: 5, labels: 4, .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains(TRAIN_IMAGES) && text.contains(TRAIN_LABELS), "{text}");
    }

    #[test]
    fn image_sizes_that_disagree() {
        let f = Fixture::new("sizes");
        f.write(TEST_IMAGES, &images_file(3, 3, 4, 36));
        let e = f.read(None).unwrap_err();
        assert!(matches!(e, IdxError::SizeMismatch { test_rows: 3, test_cols: 4, .. }), "{e}");
    }

    #[test]
    fn labels_out_of_range_and_one_class() {
        let f = Fixture::new("labels");
        let e = f.read(Some(2)).unwrap_err();
        assert!(
            matches!(e, IdxError::LabelOutOfRange { index: 2, label: 2, classes: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().contains(TRAIN_LABELS), "{e}");

        f.write(TRAIN_LABELS, &labels_file(&[0; 5]));
        f.write(TEST_LABELS, &labels_file(&[0; 3]));
        let e = f.read(None).unwrap_err();
        assert!(matches!(e, IdxError::OneClass { label: 0, .. }), "{e}");
        assert_eq!(f.read(Some(2)).unwrap().classes, 2);
    }

    #[test]
    fn fnv1a_reference_values() {
        // From the FNV reference test suite.
        let hash = |s: &[u8]| {
            let mut h = Fnv1a::new();
            h.update(s);
            h.finish()
        };
        assert_eq!(hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
