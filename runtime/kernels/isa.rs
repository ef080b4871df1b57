//! The instruction set a loop is compiled for, chosen once per pass.
//!
//! A loop that should run with the widest instructions the processor has is written once, as
//! an [`IsaLoop`], and [`Isa::run`] runs it compiled for the chosen set: every `#[target_feature]`
//! trampoline of the fused kernels is generated here, from one definition per instruction set.
//! Only the baseline's code path, the trampolines' features and the compiler's choice of vector
//! width differ. A loop fuses a multiply-add only where it asks for one (`mul_add`, see
//! [`math`](super::math)), never by contraction, and the baseline computes that one as a
//! correctly rounded library call: so every set computes the same bits (`batch`'s and
//! `finite`'s tests compare them with the baseline), the AVX2 and AVX-512 sets (compiled with
//! FMA, as ATen's are) fastest.

/// An instruction set a loop can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// The baseline the crate is compiled for.
    Baseline,
    /// AVX2 and FMA (x86-64): the same arithmetic, eight f32 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 (x86-64-v4: F, VL, BW, DQ; and FMA): the same arithmetic, sixteen f32 lanes.
    /// ATen's own CPU kernels run this way where the processor has it; on the 2-core AMD EPYC
    /// benchmark VM it streams Adam's five operands faster than AVX2 (see the README's
    /// Performance section).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// A loop to run under one instruction set: [`run`](IsaLoop::run) must be `#[inline(always)]`,
/// so that its body (and the loops it calls, themselves `#[inline(always)]`) is compiled into
/// the trampoline with the trampoline's target features.
pub(crate) trait IsaLoop {
    /// What the loop returns.
    type Output;
    /// The loop itself.
    fn run(self) -> Self::Output;
}

impl Isa {
    /// The widest instruction set this processor runs.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512_detected() {
                return Isa::Avx512;
            }
            if avx2_detected() {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// Runs `l` compiled for this instruction set. `self` must come from [`Isa::detect`] or
    /// [`Isa::available`] (only the processor's own sets are ever constructed).
    #[inline(always)]
    pub(crate) fn run<L: IsaLoop>(self, l: L) -> L::Output {
        match self {
            Isa::Baseline => l.run(),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` is only constructed when the processor reports AVX2 and FMA
            // (`avx2_detected`).
            Isa::Avx2 => unsafe { trampolines::avx2(l) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512` is only constructed when the processor reports AVX-512 F,
            // VL, BW and DQ, and FMA (`avx512_detected`).
            Isa::Avx512 => unsafe { trampolines::avx512(l) },
        }
    }

    /// Every instruction set this processor runs, the baseline first (for the tests that hold
    /// each one to the baseline's bits).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let mut out = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if avx2_detected() {
                out.push(Isa::Avx2);
            }
            if avx512_detected() {
                out.push(Isa::Avx512);
            }
        }
        out
    }
}

/// Whether the processor has the features [`Isa::Avx2`] is compiled with.
#[cfg(target_arch = "x86_64")]
fn avx2_detected() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("fma")
}

/// Whether the processor has the AVX-512 subsets (and FMA) [`Isa::Avx512`] is compiled with.
#[cfg(target_arch = "x86_64")]
fn avx512_detected() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") && has!("fma")
}

#[cfg(target_arch = "x86_64")]
mod trampolines {
    use super::IsaLoop;

    /// One trampoline per instruction set: `IsaLoop::run` inlined into a function compiled
    /// with the set's target features.
    macro_rules! trampoline {
        ($($(#[$doc:meta])* $name:ident = $features:literal;)*) => {$(
            $(#[$doc])*
            ///
            /// # Safety
            #[doc = concat!("The processor must support `", $features, "`.")]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<L: IsaLoop>(l: L) -> L::Output {
                l.run()
            }
        )*};
    }

    trampoline! {
        /// The loop compiled for AVX2: vectorised eight f32 wide, `mul_add` one `vfmadd`.
        avx2 = "avx2,fma";
        /// The loop compiled for AVX-512: sixteen f32 lanes, `mul_add` one `vfmadd`.
        avx512 = "avx512f,avx512vl,avx512bw,avx512dq,fma";
    }
}
