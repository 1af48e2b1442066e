//! Build helpers behind `cargo xtask`: the guest kernel ([`kernel`]), the
//! static guest agent ([`agent`]) and the initramfs ([`initramfs`]), put
//! together as the guest image by [`guest`]. The kernel and initramfs code is
//! generic so that other images (the nested test host) reuse it.

pub mod agent;
pub mod artefact;
pub mod debian;
pub mod debian_kernel;
pub mod elf;
pub mod guest;
pub mod initramfs;
pub mod kernel;
pub mod node_image;
pub mod stage1;
pub mod testhost;
pub mod testhost_qemu;
