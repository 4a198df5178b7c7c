//! Every diffusers fixture repository (`fixtures/diffusers/`, `cargo xtask fixtures`) is
//! detected through the view that serves it in ComfyUI's layout: the diffusers layout it is
//! in, and the architecture of the served names by the one arch table.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

use std::path::Path;

use detect::detect;

#[test]
fn diffusers_repositories_are_detected_from_their_served_names() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/diffusers");
    for (repo, layout, arch) in [
        ("FLUX.1-tiny", "flux", "flux"),
        ("sd3-tiny", "sd3", "sd3"),
        ("sdxl-tiny", "unet", "sdxl"),
        ("wan-tiny", "wan", "wan"),
        ("z-image-tiny", "z_image", "z_image"),
        ("lumina2-tiny", "lumina2", "lumina2"),
        ("FLUX.2-tiny", "flux2", "flux2"),
    ] {
        let d = detect(&root.join(repo)).unwrap();
        assert_eq!(d.diffusers.as_deref(), Some(layout), "{repo}");
        assert_eq!(d.architecture.as_deref(), Some(arch), "{repo}");
        assert!(d.supported_as_source, "{repo}");
    }
}
