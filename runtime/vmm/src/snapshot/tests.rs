use std::path::Path;

use super::memory_file::{self, MemoryFileError, MemoryHeader, Region, HEADER_PAGE};
use super::state_file::{self, StateFileError, StateHeader, HEADER_LEN, MAX_BODY_LEN};
use super::{SnapshotId, FORMAT_VERSION};

const STATE: &str = "/t/vm.state";
const MEM: &str = "/t/vm.mem";
const MIB: u64 = 1 << 20;

fn header() -> StateHeader {
    StateHeader {
        id: SnapshotId([7; 16]),
        cpuid_digest: [0xab; 32],
        guest_memory_bytes: 256 * MIB,
        created_unix_ms: 1_796_000_000_000,
        vmm_version: "0.1.0 abc1234".into(),
    }
}

fn decode(bytes: &[u8]) -> Result<(StateHeader, &[u8]), StateFileError> {
    state_file::decode(Path::new(STATE), bytes)
}

/// Rewrites the header CRC after a deliberate header edit, so the check
/// after the CRC is the one that fires.
fn reseal_header(bytes: &mut [u8]) {
    let crc = crc32fast::hash(&bytes[..120]);
    bytes[120..124].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn state_file_round_trip() {
    let body = br#"{"vcpus":[]}"#;
    let bytes = state_file::encode(&header(), body);
    assert_eq!(bytes.len(), HEADER_LEN + body.len() + 4);
    let (h, b) = decode(&bytes).unwrap();
    assert_eq!(h, header());
    assert_eq!(b, body);
    // An empty body is framed too.
    let bytes = state_file::encode(&header(), b"");
    assert_eq!(decode(&bytes).unwrap().1, b"");
}

#[test]
fn state_file_vmm_version_is_cut_at_a_character_boundary() {
    let mut h = header();
    h.vmm_version = "ü".repeat(20); // 40 bytes; 24 keep 12 characters
    let bytes = state_file::encode(&h, b"{}");
    assert_eq!(decode(&bytes).unwrap().0.vmm_version, "ü".repeat(12));
}

#[test]
fn state_file_refusals_name_the_file_and_the_cause() {
    let good = state_file::encode(&header(), b"{\"a\":1}");

    let err = decode(b"\x7fELF\x02\x01\x01\x00rest").unwrap_err();
    assert_eq!(
        err.to_string(),
        "/t/vm.state: not a boxlite-vmm snapshot (it starts with 7f454c4602010100)"
    );
    assert!(matches!(
        decode(b"").unwrap_err(),
        StateFileError::NotASnapshot { .. }
    ));

    let err = decode(&good[..100]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/t/vm.state: truncated: the header needs 128 bytes, the file has 100"
    );

    let mut other_version = good.clone();
    other_version[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let err = decode(&other_version).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "/t/vm.state: snapshot format version {}; this boxlite-vmm reads version {} — \
             recreate the snapshot",
            FORMAT_VERSION + 1,
            FORMAT_VERSION
        )
    );

    let mut flipped = good.clone();
    flipped[90] ^= 1; // inside the creation time
    let err = decode(&flipped).unwrap_err();
    assert!(
        matches!(err, StateFileError::Checksum { what: "header", .. }),
        "{err}"
    );

    let mut flipped = good.clone();
    flipped[HEADER_LEN + 2] ^= 1; // inside the body
    let err = decode(&flipped).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/t/vm.state: body checksum mismatch"),
        "{err}"
    );

    let err = decode(&good[..good.len() - 1]).unwrap_err();
    assert_eq!(
        err,
        StateFileError::Truncated {
            path: STATE.into(),
            what: "the header's body length and the trailer",
            needed: good.len() as u64,
            len: good.len() as u64 - 1,
        }
    );

    let mut longer = good.clone();
    longer.push(0);
    let err = decode(&longer).unwrap_err();
    assert!(
        err.to_string().contains("1 bytes after the trailer"),
        "{err}"
    );

    let mut huge = good.clone();
    huge[24..32].copy_from_slice(&(MAX_BODY_LEN + 1).to_le_bytes());
    reseal_header(&mut huge);
    let err = decode(&huge).unwrap_err();
    assert!(
        err.to_string().contains("at most 16777216 is read"),
        "{err}"
    );

    let mut past_the_end = good.clone();
    past_the_end[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    reseal_header(&mut past_the_end);
    assert!(matches!(
        decode(&past_the_end).unwrap_err(),
        StateFileError::Malformed { .. }
    ));

    for (at, what) in [(16, "flags 0x3"), (20, "reserved"), (124, "reserved")] {
        let mut edited = good.clone();
        edited[at] |= 2;
        if at < 120 {
            reseal_header(&mut edited);
        }
        let err = decode(&edited).unwrap_err();
        assert!(err.to_string().contains(what), "byte {at}: {err}");
    }

    let mut header_len = good.clone();
    header_len[12] = 64;
    reseal_header(&mut header_len);
    assert!(decode(&header_len)
        .unwrap_err()
        .to_string()
        .contains("header length 64, expected 128"));
}

fn memory() -> MemoryHeader {
    MemoryHeader {
        id: SnapshotId([7; 16]),
        guest_memory_bytes: 3 * MIB,
        regions: vec![
            Region {
                guest_addr: 0,
                size: 2 * MIB,
                file_offset: 0,
            },
            Region {
                guest_addr: 4 << 30,
                size: MIB,
                file_offset: 2 * MIB,
            },
        ],
    }
}

/// The header page of `h` checked as a file of `len` bytes.
fn decode_memory(h: &MemoryHeader, len: u64) -> Result<MemoryHeader, MemoryFileError> {
    let page = memory_file::encode_header(h).unwrap();
    memory_file::decode_header(Path::new(MEM), &page, len, SnapshotId([7; 16]))
}

#[test]
fn memory_file_round_trip() {
    let page = memory_file::encode_header(&memory()).unwrap();
    assert_eq!(page.len() as u64, HEADER_PAGE);
    let full = HEADER_PAGE + 3 * MIB;
    assert_eq!(decode_memory(&memory(), full).unwrap(), memory());
    assert_eq!(memory().regions[1].data_offset(), HEADER_PAGE + 2 * MIB);
}

#[test]
fn memory_file_refusals_name_the_file_and_the_cause() {
    let full = HEADER_PAGE + 3 * MIB;
    let err = memory_file::decode_header(Path::new(MEM), b"BXLSNAP\0", 8, SnapshotId([7; 16]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "/t/vm.mem: not a boxlite-vmm snapshot memory file (it starts with 42584c534e415000)"
    );

    let err = decode_memory(&memory(), full - 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "/t/vm.mem is {} bytes; its regions need {full}: the file is truncated",
            full - 1
        )
    );

    let mut other = memory();
    other.id = SnapshotId([9; 16]);
    let err = decode_memory(&other, full).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "/t/vm.mem belongs to snapshot {}, the state file to {}",
            "09".repeat(16),
            "07".repeat(16)
        )
    );

    let mut page = memory_file::encode_header(&memory()).unwrap();
    page[33] ^= 1;
    let err =
        memory_file::decode_header(Path::new(MEM), &page, full, SnapshotId([7; 16])).unwrap_err();
    assert!(matches!(err, MemoryFileError::Checksum { .. }), "{err}");

    let mut page = memory_file::encode_header(&memory()).unwrap();
    page[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let err =
        memory_file::decode_header(Path::new(MEM), &page, full, SnapshotId([7; 16])).unwrap_err();
    assert!(
        matches!(err, MemoryFileError::Version { found, .. } if found == FORMAT_VERSION + 1),
        "{err}"
    );
}

/// One deliberate mistake in a region table.
type EditHeader = dyn Fn(&mut MemoryHeader);

#[test]
fn memory_file_region_tables_are_checked() {
    let full = HEADER_PAGE + 8 * MIB;
    let cases: Vec<(&str, Box<EditHeader>)> = vec![
        (
            "not page aligned",
            Box::new(|h| h.regions[1].file_offset += 1),
        ),
        (
            "empty or not page aligned",
            Box::new(|h| h.regions[0].size = 0),
        ),
        (
            "regions 0 and 1 overlap",
            Box::new(|h| h.regions[1].guest_addr = MIB),
        ),
        (
            "regions 0 and 1 overlap",
            Box::new(|h| h.regions[1].file_offset = MIB),
        ),
        (
            "the regions hold 3145728 bytes",
            Box::new(|h| h.guest_memory_bytes = 4 * MIB),
        ),
        (
            "ends past 2^64",
            Box::new(|h| h.regions[1].guest_addr = u64::MAX - 4095),
        ),
    ];
    for (want, edit) in cases {
        let mut h = memory();
        edit(&mut h);
        let err = decode_memory(&h, full).unwrap_err();
        assert!(
            matches!(err, MemoryFileError::Malformed { .. }),
            "{want}: {err}"
        );
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
    let mut none = memory();
    none.regions.clear();
    assert_eq!(
        memory_file::encode_header(&none).unwrap_err(),
        MemoryFileError::TooManyRegions(0)
    );
    let mut many = memory();
    many.regions = vec![memory().regions[0]; memory_file::MAX_REGIONS + 1];
    assert!(memory_file::encode_header(&many).is_err());
}

#[test]
fn snapshot_ids_are_random_and_print_as_hex() {
    let (a, b) = (SnapshotId::random().unwrap(), SnapshotId::random().unwrap());
    assert_ne!(a, b);
    assert_eq!(a.to_string().len(), 32);
    assert_eq!(SnapshotId([0xa5; 16]).to_string(), "a5".repeat(16));
}
