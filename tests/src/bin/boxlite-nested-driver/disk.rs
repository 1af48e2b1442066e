//! The `blk` scenario's disk: a raw image whose first sector is an MBR
//! with one partition. The guest kernel reads that sector through the
//! virtio-blk queue when it scans partitions, so the partition's start and
//! size showing up in the guest's sysfs prove that data read from this file
//! reached the guest intact.

use std::path::Path;

pub const SECTOR: u64 = 512;

/// Where the image's one partition lies, in sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    pub start: u32,
    pub sectors: u32,
}

/// Writes a `total_sectors` raw image with an MBR describing `part`
/// (type 0x83, Linux) and zeroes elsewhere.
pub fn write_mbr_image(path: &Path, total_sectors: u64, part: Partition) -> std::io::Result<()> {
    assert!(
        u64::from(part.start) + u64::from(part.sectors) <= total_sectors,
        "partition {part:?} does not fit in {total_sectors} sectors"
    );
    let mut image = vec![0u8; (total_sectors * SECTOR) as usize];
    let entry = &mut image[446..462];
    entry[0] = 0x00; // not bootable
                     // CHS fields (1..4, 5..8) stay zero: Linux uses the LBA fields.
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&part.start.to_le_bytes());
    entry[12..16].copy_from_slice(&part.sectors.to_le_bytes());
    image[510] = 0x55;
    image[511] = 0xaa;
    std::fs::write(path, image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbr_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let part = Partition {
            start: 64,
            sectors: 1000,
        };
        write_mbr_image(&path, 2048, part).unwrap();
        let img = std::fs::read(&path).unwrap();
        assert_eq!(img.len(), 2048 * 512);
        assert_eq!(&img[510..512], [0x55, 0xaa]);
        assert_eq!(img[446 + 4], 0x83);
        assert_eq!(&img[454..458], 64u32.to_le_bytes());
        assert_eq!(&img[458..462], 1000u32.to_le_bytes());
        // The other three entries are empty.
        assert!(img[462..510].iter().all(|b| *b == 0));
    }
}
