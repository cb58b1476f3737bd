//! The CPUID a guest sees, and the compatibility baseline.
//!
//! Each vCPU gets KVM's supported CPUID (`KVM_GET_SUPPORTED_CPUID`) with its own APIC IDs
//! patched in (leaf 1 EBX[31:24], leaves 0xB/0x1F EDX, AMD leaf 0x8000001E EAX). What was set
//! is recorded in the vCPU state, so a restored or moved guest sees exactly the same CPUID,
//! and a destination can tell whether it can offer it ([`missing_features`]).
//!
//! ## Compatibility mode (`cpu_compat = true`)
//! Like Hyper-V's "migrate to a physical computer with a different processor version", the
//! guest is shown a fixed baseline of one vendor, so it can move between any two processors
//! of that vendor that have the baseline (every x86-64 CPU since about 2011 for Intel, 2013
//! for AMD). The vendor string, family/model/stepping, the brand string, cache and topology
//! leaves stay as the host reports them; features are masked to:
//!
//! | leaf | register | kept |
//! |---|---|---|
//! | 0x1 | ECX | SSE3, PCLMULQDQ, SSSE3, CX16, SSE4.1, SSE4.2, x2APIC\*, POPCNT, TSC-deadline\*, AES, XSAVE, OSXSAVE, hypervisor |
//! | 0x1 | EDX | FPU, VME, DE, PSE, TSC, MSR, PAE, MCE, CX8, APIC, SEP, MTRR, PGE, MCA, CMOV, PAT, PSE36, CLFSH, MMX, FXSR, SSE, SSE2 |
//! | 0x6 | all | nothing (no thermal/power features) |
//! | 0x7 | all | nothing (no AVX2, BMI, ERMS, ... ; max subleaf 0) |
//! | 0xD | subleaf 0 | XCR0 = x87 \| SSE only, save area 576 bytes; subleaf 1 nothing (no XSAVEOPT/XSAVEC/XSAVES); subleaves ≥ 2 removed |
//! | 0x4000_0001 | EAX | kvmclock (both MSR sets), NOP_IO_DELAY, clocksource-stable |
//! | 0x8000_0001 | ECX | LAHF/SAHF, LZCNT (ABM) |
//! | 0x8000_0001 | EDX | the leaf-1 EDX bits 0-17, 23, 24 above (AMD mirrors them), SYSCALL, NX, LM |
//! | 0x8000_0007 | all | nothing (no invariant-TSC promise across hosts) |
//! | 0x8000_0008 | EBX | nothing (address sizes in EAX are kept) |
//!
//! Basic leaves above 0xD and extended leaves above 0x8000_0008 are removed. Features marked
//! \* are emulated by KVM's in-kernel LAPIC and do not depend on the host CPU. This is
//! x86-64-v2 plus AES, PCLMULQDQ and XSAVE (x87/SSE state only).
//!
//! ## Under `kvm_pvm`
//! PVM runs guest ring-3 code natively, and a ring-3 `cpuid` executes on the host CPU, so the
//! guest sees the host's features whatever the VMM configured; PVM's `KVM_GET_CPUID2` reports
//! exactly that (while `KVM_GET_SUPPORTED_CPUID` reports a much smaller table). The recorded
//! CPUID is therefore read back with `KVM_GET_CPUID2` (what the guest really sees), and what a
//! host can offer is measured the same way ([`host_offer`]): set the supported table on a
//! probe vCPU and read it back. On hardware virtualization both are simply the tables set.
//! Compatibility mode is applied on PVM too, but cannot hide features from ring-3 code there.

use kvm_bindings::kvm_cpuid_entry2;

/// The CPU vendor, from leaf 0's vendor string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD (or HygonGenuine, which follows AMD's layout).
    Amd,
    /// Anything else, with its vendor string.
    Other(String),
}

impl std::fmt::Display for CpuVendor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CpuVendor::Intel => f.write_str("Intel"),
            CpuVendor::Amd => f.write_str("AMD"),
            CpuVendor::Other(s) => write!(f, "{s:?}"),
        }
    }
}

/// Leaf 1 ECX bits of the baseline.
pub const BASE_1_ECX: u32 = bits(&[0, 1, 9, 13, 19, 20, 21, 23, 24, 25, 26, 27, 31]);
/// Leaf 1 EDX bits of the baseline.
pub const BASE_1_EDX: u32 = bits(&[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26,
]);
/// Leaf 0x8000_0001 ECX bits of the baseline.
pub const BASE_E1_ECX: u32 = bits(&[0, 5]);
/// Leaf 0x8000_0001 EDX bits of the baseline.
/// AMD mirrors leaf-1 EDX bits 0-17, 23 and 24 here; bits 25-27 mean other things (FFXSR,
/// 1 GiB pages, RDTSCP) and are not in the baseline.
pub const BASE_E1_EDX: u32 = (BASE_1_EDX & (0x3FFFF | bits(&[23, 24]))) | bits(&[11, 20, 29]);
/// Leaf 0x4000_0001 EAX bits (KVM paravirtual features) of the baseline.
pub const BASE_KVM_EAX: u32 = bits(&[0, 1, 3, 24]);
/// XCR0 bits of the baseline (x87, SSE).
pub const BASE_XCR0: u32 = 0x3;
/// Size of the XSAVE area with only x87 and SSE state.
pub const BASE_XSAVE_SIZE: u32 = 576;

const fn bits(list: &[u32]) -> u32 {
    let mut v = 0u32;
    let mut i = 0;
    while i < list.len() {
        v |= 1 << list[i];
        i += 1;
    }
    v
}

/// The vendor of a CPUID table.
pub fn vendor_of(entries: &[kvm_cpuid_entry2]) -> CpuVendor {
    let Some(e) = find(entries, 0, 0) else {
        return CpuVendor::Other(String::new());
    };
    let mut s = Vec::with_capacity(12);
    for r in [e.ebx, e.edx, e.ecx] {
        s.extend_from_slice(&r.to_le_bytes());
    }
    match &s[..] {
        b"GenuineIntel" => CpuVendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => CpuVendor::Amd,
        other => CpuVendor::Other(String::from_utf8_lossy(other).into_owned()),
    }
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

/// The CPUID of vCPU `vcpu` out of `vcpus`, from KVM's supported table.
pub fn guest_cpuid(
    supported: &[kvm_cpuid_entry2],
    vcpu: u32,
    vcpus: u32,
    compat: bool,
) -> Vec<kvm_cpuid_entry2> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.to_vec();
    if compat {
        apply_baseline(&mut entries);
    }
    for e in &mut entries {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_FFFF) | ((vcpu & 0xFF) << 24) | (vcpus.min(255) << 16);
            }
            0xB | 0x1F => e.edx = vcpu,
            0x8000_001E => e.eax = vcpu,
            _ => {}
        }
    }
    entries
}

/// Masks a CPUID table to the documented baseline (see the module doc).
pub fn apply_baseline(entries: &mut Vec<kvm_cpuid_entry2>) {
    let max_basic = find(entries, 0, 0).map_or(0, |e| e.eax).min(0xD);
    let max_ext = find(entries, 0x8000_0000, 0)
        .map_or(0x8000_0000, |e| e.eax)
        .min(0x8000_0008);
    entries.retain(|e| {
        let f = e.function;
        let basic = f < 0x4000_0000 && f <= max_basic;
        let kvm = f == 0x4000_0000 || f == 0x4000_0001;
        let ext = (0x8000_0000..=max_ext).contains(&f);
        let xsave_extra = f == 0xD && e.index >= 2;
        (basic || kvm || ext) && !xsave_extra
    });
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (0x0, _) => e.eax = max_basic,
            (0x1, _) => {
                e.ecx &= BASE_1_ECX;
                e.edx &= BASE_1_EDX;
            }
            (0x6, _) | (0x7, _) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (0xD, 0) => {
                e.eax &= BASE_XCR0;
                e.edx = 0;
                e.ebx = BASE_XSAVE_SIZE;
                e.ecx = BASE_XSAVE_SIZE;
            }
            (0xD, 1) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (0x4000_0000, _) => e.eax = 0x4000_0001,
            (0x4000_0001, _) => {
                e.eax &= BASE_KVM_EAX;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (0x8000_0000, _) => e.eax = max_ext,
            (0x8000_0001, _) => {
                e.ecx &= BASE_E1_ECX;
                e.edx &= BASE_E1_EDX;
            }
            (0x8000_0007, _) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (0x8000_0008, _) => e.ebx = 0,
            _ => {}
        }
    }
}

/// What this host shows a guest: KVM's supported table, set on a probe vCPU of a throwaway
/// VM and read back (see the module doc for why the read-back matters under `kvm_pvm`).
pub fn host_offer(kvm: &kvm_ioctls::Kvm) -> Result<Vec<kvm_cpuid_entry2>, kvm_ioctls::Error> {
    let supported = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
    let vm = kvm.create_vm()?;
    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&supported)?;
    let seen = vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
    // Union of both: a bit that either table offers is available to guests of this host.
    let mut out: Vec<kvm_cpuid_entry2> = seen.as_slice().to_vec();
    for s in supported.as_slice() {
        match out
            .iter_mut()
            .find(|e| e.function == s.function && e.index == s.index)
        {
            Some(e) => {
                e.eax |= s.eax;
                e.ebx |= s.ebx;
                e.ecx |= s.ecx;
                e.edx |= s.edx;
            }
            None => out.push(*s),
        }
    }
    Ok(out)
}

/// (leaf, subleaf, register name, bits that the host computes itself and need no check).
const CHECKED: [(u32, u32, &str, u32); 10] = [
    (0x1, 0, "ecx", (1 << 27) | (1 << 31)),
    (0x1, 0, "edx", 0),
    (0x7, 0, "ebx", 0),
    (0x7, 0, "ecx", 1 << 4),
    (0x7, 0, "edx", 0),
    (0x7, 1, "eax", 0),
    (0xD, 0, "eax", 0),
    (0xD, 1, "eax", 0),
    (0x8000_0001, 0, "ecx", 0),
    (0x8000_0001, 0, "edx", 0),
];

fn reg(e: &kvm_cpuid_entry2, name: &str) -> u32 {
    match name {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

/// Every checked feature bit set in `table`: (leaf, subleaf, register, bit).
fn set_features(table: &[kvm_cpuid_entry2]) -> impl Iterator<Item = (u32, u32, &'static str, u32)> {
    CHECKED
        .into_iter()
        .flat_map(move |(leaf, sub, name, ignore)| {
            let bits = find(table, leaf, sub).map_or(0, |e| reg(e, name) & !ignore);
            (0..32u32)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| (leaf, sub, name, bit))
        })
}

/// Features the guest was shown (`recorded`) that `host` (a supported-CPUID table) cannot
/// offer, as readable names; empty if the guest can run on that host. A different vendor is
/// reported as one entry.
pub fn missing_features(recorded: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<String> {
    let mut out = Vec::new();
    let (rv, hv) = (vendor_of(recorded), vendor_of(host));
    if rv != hv {
        out.push(format!("CPU vendor {rv} (this host is {hv})"));
    }
    for (leaf, sub, name, bit) in set_features(recorded) {
        let have = find(host, leaf, sub).map_or(0, |h| reg(h, name));
        if have & (1 << bit) == 0 {
            out.push(feature_name(leaf, sub, name, bit));
        }
    }
    out
}

/// Every checked feature the guest was shown (`recorded`), named as [`missing_features`]
/// names them ("AVX2 (CPUID 0x7 ebx bit 5)").
pub fn used_features(recorded: &[kvm_cpuid_entry2]) -> Vec<String> {
    set_features(recorded)
        .map(|(leaf, sub, name, bit)| feature_name(leaf, sub, name, bit))
        .collect()
}

/// The features of `recorded` that `hidden` names, as [`missing_features`] names them: what
/// a host that pretends to lack `hidden` would report missing. An entry of `hidden` names a
/// feature by its short name, without case ("avx512f", "AVX2"), or by its place ("CPUID 0x7
/// ebx bit 16"); entries that name no feature the guest uses match nothing.
pub fn hidden_features_used(recorded: &[kvm_cpuid_entry2], hidden: &[String]) -> Vec<String> {
    set_features(recorded)
        .filter(|&(leaf, sub, name, bit)| {
            let short = short_name(leaf, sub, name, bit);
            let place = place_name(leaf, sub, name, bit);
            hidden.iter().any(|h| {
                let h = h.trim();
                (!short.is_empty() && h.eq_ignore_ascii_case(short))
                    || h.eq_ignore_ascii_case(&place)
            })
        })
        .map(|(leaf, sub, name, bit)| feature_name(leaf, sub, name, bit))
        .collect()
}

/// Whether `name` is a feature short name this module knows ("avx512f", without case), for
/// checking a host's configuration.
pub fn is_feature_name(name: &str) -> bool {
    NAMED
        .iter()
        .any(|&(_, _, _, _, n)| n.eq_ignore_ascii_case(name.trim()))
}

/// (leaf, subleaf, register, bit, short name) of the features with a common name.
const NAMED: [(u32, u32, &str, u32, &str); 37] = [
    (0x1, 0, "ecx", 0, "SSE3"),
    (0x1, 0, "ecx", 1, "PCLMULQDQ"),
    (0x1, 0, "ecx", 9, "SSSE3"),
    (0x1, 0, "ecx", 12, "FMA"),
    (0x1, 0, "ecx", 13, "CX16"),
    (0x1, 0, "ecx", 19, "SSE4.1"),
    (0x1, 0, "ecx", 20, "SSE4.2"),
    (0x1, 0, "ecx", 22, "MOVBE"),
    (0x1, 0, "ecx", 23, "POPCNT"),
    (0x1, 0, "ecx", 25, "AES"),
    (0x1, 0, "ecx", 26, "XSAVE"),
    (0x1, 0, "ecx", 28, "AVX"),
    (0x1, 0, "ecx", 29, "F16C"),
    (0x1, 0, "ecx", 30, "RDRAND"),
    (0x7, 0, "ebx", 3, "BMI1"),
    (0x7, 0, "ebx", 5, "AVX2"),
    (0x7, 0, "ebx", 8, "BMI2"),
    (0x7, 0, "ebx", 9, "ERMS"),
    (0x7, 0, "ebx", 16, "AVX512F"),
    (0x7, 0, "ebx", 17, "AVX512DQ"),
    (0x7, 0, "ebx", 18, "RDSEED"),
    (0x7, 0, "ebx", 19, "ADX"),
    (0x7, 0, "ebx", 21, "AVX512IFMA"),
    (0x7, 0, "ebx", 28, "AVX512CD"),
    (0x7, 0, "ebx", 29, "SHA"),
    (0x7, 0, "ebx", 30, "AVX512BW"),
    (0x7, 0, "ebx", 31, "AVX512VL"),
    (0x7, 0, "ecx", 1, "AVX512VBMI"),
    (0x7, 0, "ecx", 6, "AVX512VBMI2"),
    (0x7, 0, "ecx", 9, "VAES"),
    (0x7, 0, "ecx", 10, "VPCLMULQDQ"),
    (0x7, 0, "ecx", 11, "AVX512VNNI"),
    (0x7, 0, "ecx", 12, "AVX512BITALG"),
    (0x7, 0, "ecx", 14, "AVX512VPOPCNTDQ"),
    (0x8000_0001, 0, "ecx", 5, "LZCNT"),
    (0x8000_0001, 0, "edx", 26, "1GB pages"),
    (0x8000_0001, 0, "edx", 27, "RDTSCP"),
];

fn short_name(leaf: u32, sub: u32, reg: &str, bit: u32) -> &'static str {
    NAMED
        .iter()
        .find(|&&(l, s, r, b, _)| l == leaf && s == sub && r == reg && b == bit)
        .map_or("", |&(_, _, _, _, n)| n)
}

fn place_name(leaf: u32, sub: u32, reg: &str, bit: u32) -> String {
    if sub == 0 {
        format!("CPUID {leaf:#x} {reg} bit {bit}")
    } else {
        format!("CPUID {leaf:#x}.{sub} {reg} bit {bit}")
    }
}

fn feature_name(leaf: u32, sub: u32, reg: &str, bit: u32) -> String {
    let known = short_name(leaf, sub, reg, bit);
    let place = place_name(leaf, sub, reg, bit);
    if known.is_empty() {
        place
    } else {
        format!("{known} ({place})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn amd_host() -> Vec<kvm_cpuid_entry2> {
        // "AuthenticAMD": ebx "Auth", edx "enti", ecx "cAMD"
        vec![
            entry(0, 0, 0x10, 0x6874_7541, 0x444D_4163, 0x6974_6E65),
            entry(1, 0, 0x00A0_0F11, 0x0000_0800, 0xFEDA_3203, 0x178B_FBFF),
            entry(7, 0, 0, 0x219C_97A9, 0x0040_069C, 0x10),
            entry(0xD, 0, 0x7, 0x340, 0x340, 0),
            entry(0xD, 1, 0xF, 0, 0, 0),
            entry(0xD, 2, 0x100, 0x240, 0, 0),
            entry(0x10, 0, 0, 0, 0, 0),
            entry(0x4000_0000, 0, 0x4000_0001, 0, 0, 0),
            entry(0x4000_0001, 0, 0x0100_7AFB, 0, 0, 0),
            entry(0x8000_0000, 0, 0x8000_0021, 0, 0, 0),
            entry(0x8000_0001, 0, 0, 0, 0x7583_F3FF, 0x2FD3_FBFF),
            entry(0x8000_0008, 0, 0x3030, 0x0100_D205, 0, 0),
            entry(0x8000_001E, 0, 0, 0, 0, 0),
        ]
    }

    #[test]
    fn vendor_is_read_from_leaf_0() {
        assert_eq!(vendor_of(&amd_host()), CpuVendor::Amd);
    }

    #[test]
    fn baseline_masks_features_and_trims_leaves() {
        let cpuid = guest_cpuid(&amd_host(), 1, 2, true);
        let leaf1 = find(&cpuid, 1, 0).unwrap();
        assert_eq!(leaf1.ecx & !BASE_1_ECX, 0);
        assert_eq!(leaf1.ecx & (1 << 28), 0, "AVX hidden");
        assert_ne!(leaf1.ecx & (1 << 20), 0, "SSE4.2 kept");
        assert_eq!(leaf1.ebx >> 24, 1, "APIC ID patched");
        assert_eq!(find(&cpuid, 7, 0).unwrap().ebx, 0, "AVX2 etc. hidden");
        assert_eq!(find(&cpuid, 0xD, 0).unwrap().eax, 0x3);
        assert!(find(&cpuid, 0xD, 2).is_none());
        assert!(find(&cpuid, 0x10, 0).is_none());
        assert!(find(&cpuid, 0x8000_001E, 0).is_none());
        assert_eq!(find(&cpuid, 0, 0).unwrap().eax, 0xD);
        assert_eq!(find(&cpuid, 0x8000_0000, 0).unwrap().eax, 0x8000_0008);
        assert_eq!(
            find(&cpuid, 0x8000_0001, 0).unwrap().edx & (1 << 26),
            0,
            "1G pages hidden"
        );
        // Without compat mode the host's features pass through.
        let full = guest_cpuid(&amd_host(), 0, 2, false);
        assert_ne!(find(&full, 7, 0).unwrap().ebx, 0);
    }

    #[test]
    fn missing_features_are_named() {
        let host = amd_host();
        let recorded = guest_cpuid(&host, 0, 1, false);
        assert!(missing_features(&recorded, &host).is_empty());
        let mut weaker = host.clone();
        for e in &mut weaker {
            if e.function == 7 && e.index == 0 {
                e.ebx &= !(1 << 5);
            }
        }
        assert_eq!(
            missing_features(&recorded, &weaker),
            vec!["AVX2 (CPUID 0x7 ebx bit 5)".to_string()]
        );
        // The baseline fits the weaker host.
        let compat = guest_cpuid(&host, 0, 1, true);
        assert!(missing_features(&compat, &weaker).is_empty());
    }

    #[test]
    fn used_features_are_named_like_missing_ones() {
        let host = amd_host();
        let recorded = guest_cpuid(&host, 0, 1, false);
        let used = used_features(&recorded);
        assert!(
            used.contains(&"AVX2 (CPUID 0x7 ebx bit 5)".to_string()),
            "{used:?}"
        );
        assert!(
            used.contains(&"SSE4.2 (CPUID 0x1 ecx bit 20)".to_string()),
            "{used:?}"
        );
        // Every feature a host lacks is one the guest uses, named the same way.
        assert!(
            missing_features(&recorded, &[])
                .iter()
                .skip(1)
                .all(|m| used.contains(m))
        );
        // The baseline uses no leaf-7 feature.
        let compat = guest_cpuid(&host, 0, 1, true);
        assert!(used_features(&compat).iter().all(|u| !u.contains("0x7 ")));
    }

    #[test]
    fn hidden_features_match_by_short_name_or_place_without_case() {
        let host = amd_host();
        let recorded = guest_cpuid(&host, 0, 1, false);
        let hidden = vec![
            "avx2".to_string(),
            " cpuid 0x1 ECX bit 20 ".to_string(),
            "avx512f".to_string(), // this host's table has no AVX-512: matches nothing
            "no-such-feature".to_string(),
        ];
        assert_eq!(
            hidden_features_used(&recorded, &hidden),
            vec![
                "SSE4.2 (CPUID 0x1 ecx bit 20)".to_string(),
                "AVX2 (CPUID 0x7 ebx bit 5)".to_string(),
            ]
        );
        // A guest in compatibility mode does not use AVX2.
        let compat = guest_cpuid(&host, 0, 1, true);
        assert_eq!(
            hidden_features_used(&compat, &["AVX2".to_string()]),
            Vec::<String>::new()
        );
        assert!(is_feature_name("avx512f") && is_feature_name("AVX2"));
        assert!(!is_feature_name("avx9000"));
    }
}
