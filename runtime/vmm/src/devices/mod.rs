//! Devices: legacy PIO devices and virtio devices.
#![warn(clippy::unwrap_used)]

pub mod legacy;
pub mod virtio;
