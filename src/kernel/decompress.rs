//! Decompressors for kernel payloads and compressed modules.
//!
//! Kernels compress their payload with whatever the build chose; Debian uses
//! xz (5.10, 6.1 generic), lz4 (6.1 cloud) and zstd (6.12). Modules come as
//! `.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz`.

use std::io::Read;

/// A compression format recognised by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Gzip,
    Xz,
    Lzma,
    Bzip2,
    Lz4Legacy,
    Zstd,
    Lzo,
}

impl Format {
    /// Identifies the format from the first bytes of a stream.
    /// The first bytes of each format, as [`Format::sniff`] knows them.
    pub const MAGICS: &[(&[u8], Format)] = &[
        (&[0x1f, 0x8b], Format::Gzip),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Format::Xz),
        (&[0x5d, 0x00, 0x00], Format::Lzma),
        (b"BZh", Format::Bzip2),
        (&[0x02, 0x21, 0x4c, 0x18], Format::Lz4Legacy),
        (&[0x28, 0xb5, 0x2f, 0xfd], Format::Zstd),
        (&[0x89, b'L', b'Z', b'O'], Format::Lzo),
    ];

    pub fn sniff(data: &[u8]) -> Option<Format> {
        Self::MAGICS
            .iter()
            .find(|(m, _)| data.starts_with(m))
            .map(|&(_, f)| f)
    }

    /// The name the kernel's Kconfig uses for this format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Gzip => "gzip",
            Format::Xz => "xz",
            Format::Lzma => "lzma",
            Format::Bzip2 => "bzip2",
            Format::Lz4Legacy => "lz4",
            Format::Zstd => "zstd",
            Format::Lzo => "lzo",
        }
    }
}

/// Why a payload could not be decompressed.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    #[error("{0} decompression is not supported")]
    Unsupported(&'static str),
    #[error("corrupt {format} data: {source}")]
    Corrupt {
        format: &'static str,
        source: std::io::Error,
    },
    #[error("unknown compression format")]
    Unknown,
    #[error("{format} data unpacks to more than {} MiB, more than any kernel or module (a damaged or hostile file?)", MAX_OUTPUT >> 20)]
    TooLarge { format: &'static str },
}

/// The most a payload may unpack to: far above any real kernel (Debian's
/// vmlinux is ~60 MB), low enough that a decompression bomb fails cleanly
/// instead of exhausting memory.
pub const MAX_OUTPUT: usize = 1 << 30;

/// Decompresses `data` in the given format. Trailing bytes after the end of
/// the compressed stream are ignored (the kernel appends its size).
pub fn decompress(format: Format, data: &[u8]) -> Result<Vec<u8>, DecompressError> {
    unpack(format, data, MAX_OUTPUT)
}

/// Decompresses at most `max` bytes; more is an error.
fn unpack(format: Format, data: &[u8], max: usize) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(max));
    let corrupt = |source| DecompressError::Corrupt {
        format: format.name(),
        source,
    };
    // One byte more than allowed tells a stream that is too large.
    let limit = max as u64 + 1;
    match format {
        Format::Gzip => {
            flate2::read::GzDecoder::new(data)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(corrupt)?;
        }
        Format::Xz => {
            let stream = liblzma::stream::Stream::new_stream_decoder(u64::MAX, 0)
                .map_err(|e| corrupt(e.into()))?;
            liblzma::read::XzDecoder::new_stream(data, stream)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(corrupt)?;
        }
        Format::Lzma => {
            let stream = liblzma::stream::Stream::new_lzma_decoder(u64::MAX)
                .map_err(|e| corrupt(e.into()))?;
            liblzma::read::XzDecoder::new_stream(data, stream)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(corrupt)?;
        }
        Format::Bzip2 => {
            bzip2::read::BzDecoder::new(data)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(corrupt)?;
        }
        Format::Zstd => {
            let mut dec = zstd::stream::read::Decoder::new(data).map_err(corrupt)?;
            // Stop after the first frame: the kernel appends its size.
            dec = dec.single_frame();
            dec.take(limit).read_to_end(&mut out).map_err(corrupt)?;
        }
        Format::Lz4Legacy => lz4_legacy(data, &mut out, max).map_err(corrupt)?,
        Format::Lzo => return Err(DecompressError::Unsupported("lzo")),
    }
    if out.len() > max {
        return Err(DecompressError::TooLarge {
            format: format.name(),
        });
    }
    Ok(out)
}

/// Sniffs the format, then decompresses.
pub fn decompress_any(data: &[u8]) -> Result<Vec<u8>, DecompressError> {
    decompress(Format::sniff(data).ok_or(DecompressError::Unknown)?, data)
}

/// The kernel's lz4 uses the legacy frame format (magic, then blocks each
/// prefixed by a little-endian compressed length, 8 MiB uncompressed each),
/// which the frame decoder of lz4_flex does not read.
fn lz4_legacy(data: &[u8], out: &mut Vec<u8>, max: usize) -> std::io::Result<()> {
    const MAGIC: u32 = 0x184c_2102;
    const BLOCK: usize = 8 << 20;
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut pos = 4;
    let mut block = vec![0u8; BLOCK];
    while pos + 4 <= data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap());
        if len == MAGIC {
            // Concatenated legacy streams.
            pos += 4;
            continue;
        }
        let len = len as usize;
        pos += 4;
        if len == 0 || pos + len > data.len() {
            // The appended size field or padding: end of stream.
            break;
        }
        let n = lz4_flex::block::decompress_into(&data[pos..pos + len], &mut block)
            .map_err(|e| invalid(&e.to_string()))?;
        out.extend_from_slice(&block[..n]);
        pos += len;
        if out.len() > max {
            break;
        }
        if n < BLOCK {
            break;
        }
    }
    if out.is_empty() {
        return Err(invalid("no lz4 block decoded"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sniffs_formats() {
        assert_eq!(Format::sniff(&[0x1f, 0x8b, 8]), Some(Format::Gzip));
        assert_eq!(Format::sniff(b"\xfd7zXZ\0rest"), Some(Format::Xz));
        assert_eq!(Format::sniff(&[0x28, 0xb5, 0x2f, 0xfd]), Some(Format::Zstd));
        assert_eq!(Format::sniff(b"ELF"), None);
    }

    #[test]
    fn round_trips_with_trailing_size() {
        let payload: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&payload).unwrap();
        let mut data = gz.finish().unwrap();
        data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        assert_eq!(decompress_any(&data).unwrap(), payload);

        let mut z = zstd::encode_all(&payload[..], 3).unwrap();
        z.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(decompress_any(&z).unwrap(), payload);

        let mut xz = Vec::new();
        liblzma::read::XzEncoder::new(&payload[..], 1)
            .read_to_end(&mut xz)
            .unwrap();
        xz.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(decompress_any(&xz).unwrap(), payload);
    }

    #[test]
    fn a_stream_unpacking_past_the_limit_is_refused_not_stored() {
        let zeros = vec![0u8; 1 << 20];
        let z = zstd::encode_all(&zeros[..], 3).unwrap();
        assert!(matches!(
            unpack(Format::Zstd, &z, 1000),
            Err(DecompressError::TooLarge { format: "zstd" })
        ));
        assert_eq!(unpack(Format::Zstd, &z, 1 << 20).unwrap().len(), 1 << 20);
        let block = lz4_flex::block::compress(&zeros);
        let mut l = 0x184c_2102u32.to_le_bytes().to_vec();
        l.extend_from_slice(&(block.len() as u32).to_le_bytes());
        l.extend_from_slice(&block);
        assert!(matches!(
            unpack(Format::Lz4Legacy, &l, 1000),
            Err(DecompressError::TooLarge { .. })
        ));
    }

    #[test]
    fn lz4_legacy_blocks() {
        let payload: Vec<u8> = b"vexec ".repeat(50_000);
        let block = lz4_flex::block::compress(&payload);
        let mut data = 0x184c_2102u32.to_le_bytes().to_vec();
        data.extend_from_slice(&(block.len() as u32).to_le_bytes());
        data.extend_from_slice(&block);
        data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        assert_eq!(decompress_any(&data).unwrap(), payload);
    }
}
