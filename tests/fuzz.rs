//! Property tests ("fuzzing on stable"): every parser vexec points at bytes
//! it did not write itself must return an error, never panic, hang or
//! allocate without bound. The suite runs a few hundred cases per property;
//! `bench/fuzz.sh` runs the same properties with a large fixed budget.

use std::io::Read;

use proptest::prelude::*;
use vexec::artifacts::initramfs::{Cpio, parse_module_list};
use vexec::kernel::decompress::{Format, decompress, decompress_any};
use vexec::kernel::image::{embedded_config, extract_vmlinux, has_pvh_entry, inspect};
use vexec::kernel::kconfig::KernelConfig;
use vexec::kernel::modules::ModInfo;
use vexec::protocol::{
    self, Aftermath, Exit, GuestMsg, HostMsg, MAX_FRAME, Stream, read_frame, write_frame,
};

/// Reads frames until the stream ends or one is refused; never more frames
/// than the input has bytes (each frame costs at least its length prefix).
fn drain<T: for<'de> serde::Deserialize<'de>>(bytes: &[u8]) {
    let mut r = bytes;
    let mut frames = 0;
    while let Ok(Some(_)) = read_frame::<T>(&mut r) {
        frames += 1;
        assert!(
            frames <= bytes.len() / 4,
            "more frames than the input holds"
        );
    }
}

/// A reader that counts what was asked of it: a hostile length prefix must
/// not make the decoder read (or reserve) past the bytes that exist.
struct Counting<'a> {
    data: &'a [u8],
    read: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.data.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

fn guest_msg() -> impl Strategy<Value = GuestMsg> {
    prop_oneof![
        (any::<u32>(), ".{0,40}", any::<u64>()).prop_map(|(version, release, uptime_ms)| {
            GuestMsg::Ready {
                version,
                release,
                uptime_ms,
            }
        }),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(GuestMsg::Stdout),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(GuestMsg::Stderr),
        (any::<i32>(), any::<u64>()).prop_map(|(c, uptime_ms)| GuestMsg::Exited {
            exit: Exit::Code(c),
            uptime_ms
        }),
        ".{0,80}".prop_map(GuestMsg::Error),
        Just(GuestMsg::InputClosed),
        any::<u64>().prop_map(|uptime_ms| GuestMsg::Mounted { uptime_ms }),
        (prop::collection::vec(".{0,60}", 0..4), any::<bool>()).prop_map(
            |(oom_kills, output_cut)| GuestMsg::Aftermath(Aftermath {
                oom_kills,
                output_cut
            })
        ),
    ]
}

fn host_msg() -> impl Strategy<Value = HostMsg> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300).prop_map(HostMsg::Stdin),
        Just(HostMsg::StdinEof),
        any::<i32>().prop_map(HostMsg::Signal),
        Just(HostMsg::OutputClosed(Stream::Stdout)),
        Just(HostMsg::OutputClosed(Stream::Stderr)),
        (
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..3),
            ".{0,20}"
        )
            .prop_map(|(setup, cwd)| HostMsg::Serve(protocol::Hooks {
                setup,
                cwd: cwd.into_bytes(),
                ..Default::default()
            })),
    ]
}

/// Valid frames, then damaged: bytes flipped, cut short, or garbage spliced.
fn damaged(frames: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = frames.len().max(1);
    (
        prop::collection::vec((0..n, any::<u8>()), 0..8),
        0..=frames.len(),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(move |(flips, cut, junk)| {
            let mut f = frames.clone();
            for (i, b) in flips {
                if i < f.len() {
                    f[i] ^= b;
                }
            }
            f.truncate(cut);
            f.extend_from_slice(&junk);
            f
        })
}

fn encoded<T: serde::Serialize>(msgs: &[T]) -> Vec<u8> {
    let mut buf = Vec::new();
    for m in msgs {
        write_frame(&mut buf, m).unwrap();
    }
    buf
}

/// One of the magics the decompressors recognise.
fn magic() -> impl Strategy<Value = &'static [u8]> {
    prop::sample::select(Format::MAGICS.iter().map(|(m, _)| *m).collect::<Vec<_>>())
}

/// A bzImage-shaped buffer: the "HdrS" magic and a random setup header, so
/// that the header's offsets and lengths are exercised, not only rejected.
fn bzimage_like() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(any::<u8>(), 0x260..0x1400),
        any::<u8>(),
        0x200u16..0x210,
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        magic(),
    )
        .prop_map(|(mut d, sects, version, vptr, offset, length, magic)| {
            d[0x1f1] = sects;
            d[0x202..0x206].copy_from_slice(b"HdrS");
            d[0x206..0x208].copy_from_slice(&version.to_le_bytes());
            d[0x20e..0x210].copy_from_slice(&vptr.to_le_bytes());
            d[0x248..0x24c].copy_from_slice(&(offset % 0x1000).to_le_bytes());
            d[0x24c..0x250].copy_from_slice(&(length % 0x1000).to_le_bytes());
            // Put a compression magic where the payload may start.
            let start = ((sects.max(1) as usize) + 1) * 512 + (offset % 0x1000) as usize;
            if start + magic.len() <= d.len() {
                d[start..start + magic.len()].copy_from_slice(magic);
            }
            d
        })
}

/// Inputs starting with one of the magics the decompressors accept.
fn compressed_like() -> impl Strategy<Value = Vec<u8>> {
    (magic(), prop::collection::vec(any::<u8>(), 0..2000))
        .prop_map(|(m, rest)| [m, &rest[..]].concat())
}

/// A minimal newc reader, written from the format's description, to check
/// what the writer produces: (name, mode, data) per entry.
fn read_newc(mut a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let total = a.len();
    let mut out = Vec::new();
    loop {
        let at = total - a.len();
        assert_eq!(at % 4, 0, "entry not 4-aligned");
        assert_eq!(&a[..6], b"070701", "bad magic at {at}");
        let field = |i: usize| {
            let s = std::str::from_utf8(&a[6 + i * 8..14 + i * 8]).unwrap();
            u32::from_str_radix(s, 16).unwrap() as usize
        };
        let (mode, size, namesize) = (field(1) as u32, field(6), field(11));
        let name = &a[110..110 + namesize];
        assert_eq!(name.last(), Some(&0), "name not NUL-terminated");
        let name = String::from_utf8(name[..namesize - 1].to_vec()).unwrap();
        let data_at = (110 + namesize).next_multiple_of(4);
        let data = a[data_at..data_at + size].to_vec();
        a = &a[(data_at + size).next_multiple_of(4)..];
        if name == "TRAILER!!!" {
            assert!(a.iter().all(|&b| b == 0), "bytes after the trailer");
            assert_eq!(total % 512, 0);
            return out;
        }
        out.push((name, mode, data));
    }
}

proptest! {
    #[test]
    fn frames_round_trip(g in prop::collection::vec(guest_msg(), 0..6),
                         h in prop::collection::vec(host_msg(), 0..6)) {
        let mut r = &encoded(&g)[..];
        for m in &g {
            prop_assert_eq!(&read_frame::<GuestMsg>(&mut r).unwrap().unwrap(), m);
        }
        prop_assert!(read_frame::<GuestMsg>(&mut r).unwrap().is_none());
        let mut r = &encoded(&h)[..];
        for m in &h {
            prop_assert_eq!(&read_frame::<HostMsg>(&mut r).unwrap().unwrap(), m);
        }
        prop_assert!(read_frame::<HostMsg>(&mut r).unwrap().is_none());
    }

    #[test]
    fn decoders_survive_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        drain::<GuestMsg>(&bytes);
        drain::<HostMsg>(&bytes);
    }

    #[test]
    fn decoders_survive_damaged_frames(
        bytes in prop::collection::vec(guest_msg(), 1..5)
            .prop_flat_map(|m| damaged(encoded(&m)))
    ) {
        drain::<GuestMsg>(&bytes);
        drain::<HostMsg>(&bytes);
    }

    #[test]
    fn hostile_length_prefixes_are_refused_or_bounded(
        len in any::<u32>(),
        body in prop::collection::vec(any::<u8>(), 0..64)
    ) {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let mut r = Counting { data: &bytes, read: 0 };
        let got = read_frame::<GuestMsg>(&mut r);
        if len as usize > MAX_FRAME {
            prop_assert!(got.is_err());
            prop_assert_eq!(r.read, 4, "read past a refused length prefix");
        } else if (len as usize) > body.len() {
            prop_assert!(got.is_err(), "a frame cut short must be an error");
        }
    }

    #[test]
    fn unknown_tags_are_errors(tag in 7u8..=127, rest in prop::collection::vec(any::<u8>(), 0..32)) {
        // Tags past the last message of either direction.
        let body = [&[tag][..], &rest].concat();
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        if tag as usize >= protocol::GUEST_MSG_COUNT {
            prop_assert!(read_frame::<GuestMsg>(&mut &bytes[..]).is_err());
        }
        if tag as usize >= protocol::HOST_MSG_COUNT {
            prop_assert!(read_frame::<HostMsg>(&mut &bytes[..]).is_err());
        }
    }

    #[test]
    fn image_reader_survives_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = inspect(&bytes);
        let _ = extract_vmlinux(&bytes);
        let _ = has_pvh_entry(&bytes);
        let _ = embedded_config(&bytes);
    }

    #[test]
    fn image_reader_survives_bzimage_headers(bytes in bzimage_like()) {
        let _ = inspect(&bytes);
        let _ = extract_vmlinux(&bytes);
    }

    #[test]
    fn image_reader_survives_elf_and_arm64_shapes(
        rest in prop::collection::vec(any::<u8>(), 0..2048),
        elf in any::<bool>()
    ) {
        let mut d = rest;
        d.resize(d.len().max(0x48), 0);
        if elf {
            d[..4].copy_from_slice(b"\x7fELF");
        } else {
            d[0x38..0x3c].copy_from_slice(b"ARM\x64");
        }
        let _ = inspect(&d);
        let _ = has_pvh_entry(&d);
        let _ = embedded_config(&[&b"IKCFG_ST\x1f\x8b"[..], &d, b"IKCFG_ED"].concat());
    }

    #[test]
    fn decompressors_survive_damaged_streams(bytes in compressed_like()) {
        let _ = decompress_any(&bytes);
        for f in [Format::Gzip, Format::Xz, Format::Zstd, Format::Lz4Legacy] {
            let _ = decompress(f, &bytes);
        }
    }

    #[test]
    fn modinfo_reader_survives_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = ModInfo::parse(&bytes);
        let _ = ModInfo::parse(&[&b"\x7fELF\x02\x01\x01"[..], &bytes].concat());
        let info = ModInfo::parse_section(&bytes);
        for d in &info.depends {
            prop_assert!(!d.is_empty() && !d.contains('-'));
        }
    }

    #[test]
    fn config_and_module_list_readers_take_any_text(text in "(?s).{0,400}") {
        let c = KernelConfig::parse(&text);
        let _ = c.get("CONFIG_VIRTIO");
        for (name, deps) in parse_module_list(&text) {
            prop_assert!(!name.is_empty() && !name.contains(char::is_whitespace));
            prop_assert!(deps.iter().all(|d| !d.is_empty()));
        }
    }

    #[test]
    fn cpio_writer_output_reads_back(
        files in prop::collection::btree_map(
            "[a-z0-9_.-]{1,12}(/[a-z0-9_.-]{1,12}){0,3}",
            prop::collection::vec(any::<u8>(), 0..700),
            0..8
        )
    ) {
        let mut cpio = Cpio::new();
        for (path, data) in &files {
            cpio.file(&format!("f/{path}"), 0o644, data);
        }
        let entries = read_newc(&cpio.finish());
        for (path, data) in &files {
            let name = format!("f/{path}");
            // A path may be both a file and (for a longer one) a directory
            // name; the last entry of that name is what the kernel keeps.
            let e = entries.iter().rev().find(|e| e.0 == name).unwrap();
            if e.1 & 0o170000 == 0o100000 {
                prop_assert_eq!(&e.2, data);
            }
        }
        for e in &entries {
            if let Some((parent, _)) = e.0.rsplit_once('/') {
                let p = entries.iter().position(|x| x.0 == parent);
                let me = entries.iter().position(|x| x.0 == e.0).unwrap();
                prop_assert!(p.is_some_and(|p| p < me), "{} before its parent", e.0);
            }
        }
    }

    /// Lines made of TAP's own pieces in any order and indentation (the
    /// malformed cases a random byte string would rarely hit), then the
    /// same input split at random: the parse never panics and gives the
    /// same cases however the stream was cut.
    #[test]
    fn tap_parser_survives_any_line_soup(
        lines in prop::collection::vec(tap_line(), 0..40),
        cut in 1usize..50,
        garbage in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        use vexec::report::tap::{Format, Parser};
        let mut text = lines.join("\n").into_bytes();
        text.extend(&garbage);
        let mut whole = Parser::new(Format::Ktap);
        whole.feed(&text);
        let whole = whole.finish(None);
        let mut pieces = Parser::new(Format::Ktap);
        for chunk in text.chunks(cut) {
            pieces.feed(chunk);
        }
        prop_assert_eq!(pieces.finish(None), whole.clone());
        let n = whole.counts();
        prop_assert!(n.passed + n.failed + n.skipped <= whole.cases.len());
        let mut auto = Parser::new(Format::Auto);
        auto.feed_kernel_log(&text);
        let _ = auto.finish(Some("stopped"));
    }
}

/// A TAP-looking line: a header, plan, result, diagnostic or bail-out,
/// indented 0-8 spaces, with numbers and directives that may not fit.
fn tap_line() -> impl Strategy<Value = String> {
    let body = prop_oneof![
        Just("KTAP version 1".to_string()),
        Just("TAP version 14".to_string()),
        (0u32..6).prop_map(|n| format!("1..{n}")),
        (
            any::<bool>(),
            0u32..8,
            "[a-z.]{0,6}",
            prop_oneof![
                Just(""),
                Just(" # SKIP r"),
                Just(" # TODO"),
                Just(" # XFAIL"),
                Just(" # TIMEOUT"),
                Just(" # ERROR x"),
                Just(" #"),
            ]
        )
            .prop_map(|(ok, n, name, d)| {
                format!("{}ok {n} {name}{d}", if ok { "" } else { "not " })
            }),
        "# [ -~]{0,10}",
        Just("# Subtest: s".to_string()),
        Just("Bail out!".to_string()),
        Just("ok".to_string()),
        "[ -~]{0,12}",
    ];
    (0usize..9, body).prop_map(|(indent, b)| format!("{}{b}", " ".repeat(indent)))
}
