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
//!
//! Which set a pass runs with is [`Isa::current`]: the widest the processor has, capped by the
//! `CASEOPT_ISA` environment variable (`avx512`, `avx2` or `baseline`, read once per process)
//! and, tighter still, by this thread's own cap ([`set_thread_cap`], what the tests and
//! `bench_step --isa` use), so that on an AVX-512 machine the AVX2 and baseline loops can be
//! timed and tested too. A cap above what the processor has changes nothing: only the
//! processor's own sets are ever constructed.

use std::cell::Cell;
use std::sync::OnceLock;

/// An instruction set a loop can be compiled for.
// Declared narrowest first: `Ord` is "narrower than", which the caps rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
    /// The widest instruction set this processor runs (asked once per process).
    pub(crate) fn widest() -> Self {
        static WIDEST: OnceLock<Isa> = OnceLock::new();
        *WIDEST.get_or_init(|| {
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
        })
    }

    /// The set a pass started on this thread runs with: [`widest`](Self::widest), capped by
    /// `CASEOPT_ISA` and by this thread's cap ([`set_thread_cap`]). Read on the thread that
    /// starts a pass, before it hands work to the pool, so a thread's cap covers its passes.
    pub(crate) fn current() -> Self {
        let mut isa = Isa::widest();
        if let Some(Ok(cap)) = env_cap() {
            isa = isa.min(*cap);
        }
        if let Some(cap) = THREAD_CAP.get() {
            isa = isa.min(cap);
        }
        isa
    }

    /// The set's name, as `CASEOPT_ISA` spells it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
        }
    }

    /// The set `name` caps at, itself capped at [`widest`](Self::widest) (so that no value of
    /// this type ever names a set the processor lacks), or the names known. A set this build
    /// has no loops for (AVX2 off x86-64) caps at the baseline, as a processor without it would.
    pub(crate) fn parse_cap(name: &str) -> Result<Isa, String> {
        let cap = match name.trim().to_ascii_lowercase().as_str() {
            "baseline" => Isa::Baseline,
            #[cfg(target_arch = "x86_64")]
            "avx2" => Isa::Avx2,
            #[cfg(target_arch = "x86_64")]
            "avx512" => Isa::Avx512,
            #[cfg(not(target_arch = "x86_64"))]
            "avx2" | "avx512" => Isa::Baseline,
            other => {
                return Err(format!(
                    "unknown instruction set `{other}` (expected avx512, avx2 or baseline)"
                ))
            }
        };
        Ok(cap.min(Isa::widest()))
    }

    /// Runs `l` compiled for this instruction set. Every value of `Isa` names one of the
    /// processor's own sets: [`Isa::widest`] detects it, [`Isa::available`] lists those detected
    /// and every cap is applied to `widest` with `min`.
    #[inline(always)]
    pub(crate) fn run<L: IsaLoop>(self, l: L) -> L::Output {
        match self {
            Isa::Baseline => l.run(),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` exists only where the processor reports AVX2 and FMA
            // (`avx2_detected`; caps are taken with `min` of `widest`).
            Isa::Avx2 => unsafe { trampolines::avx2(l) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, `Isa::Avx512` only where it reports AVX-512 F, VL, BW and DQ,
            // and FMA (`avx512_detected`).
            Isa::Avx512 => unsafe { trampolines::avx512(l) },
        }
    }

    /// Every instruction set this processor runs, the baseline first (for the tests that hold
    /// each one to the baseline's bits, and the benchmark that times each).
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

thread_local! {
    /// This thread's cap ([`set_thread_cap`]); none by default.
    static THREAD_CAP: Cell<Option<Isa>> = const { Cell::new(None) };
}

/// `CASEOPT_ISA`'s cap, read once: `None` when unset, an error for a name it does not know
/// (which the passes ignore, and [`crate::__private::kernel_isa`] reports).
pub(crate) fn env_cap() -> Option<&'static Result<Isa, String>> {
    static CAP: OnceLock<Option<Result<Isa, String>>> = OnceLock::new();
    CAP.get_or_init(|| {
        std::env::var("CASEOPT_ISA").ok().filter(|v| !v.is_empty()).map(|v| Isa::parse_cap(&v))
    })
    .as_ref()
}

/// Caps the instruction set of the passes this thread starts (`None`: no cap of its own);
/// returns the cap it had.
pub(crate) fn set_thread_cap(cap: Option<Isa>) -> Option<Isa> {
    THREAD_CAP.replace(cap)
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
