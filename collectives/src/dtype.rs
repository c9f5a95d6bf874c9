//! The element types a communicator moves, and how each one reduces.
//!
//! Floating-point reductions accumulate in f32 (bf16 and f16 are widened, reduced, and rounded
//! once at the end); integer reductions stay in their own type with two's-complement wrap-around
//! for sum and product, as NCCL does.

use half::{bf16, f16};

/// The name of an element type, carried with every call so ranks can check they agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// IEEE single precision.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
}

impl DataType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Self::BF16 | Self::F16 => 2,
            Self::F32 | Self::I32 => 4,
            Self::I64 => 8,
        }
    }

    /// Lower-case name (`f32`, `bf16`, `f16`, `i32`, `i64`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::BF16 => "bf16",
            Self::F16 => "f16",
            Self::I32 => "i32",
            Self::I64 => "i64",
        }
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}

/// An element type every backend can move and reduce: f32, bf16, f16, i32, i64 (sealed, so a
/// backend can map each one to its library's type).
///
/// A reduction widens each value to [`Scalar::Acc`], combines the ranks' values in rank order,
/// and narrows the result once.
pub trait Scalar: Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + sealed::Sealed + 'static {
    /// This type's name.
    const DTYPE: DataType;
    /// The type reductions run in: f32 for the float types, the type itself for integers.
    type Acc: Copy + Default + Send + Sync + std::fmt::Debug + 'static;
    /// Widens to the accumulator (exact).
    fn to_acc(self) -> Self::Acc;
    /// Narrows from the accumulator (round to nearest even for bf16/f16).
    fn from_acc(acc: Self::Acc) -> Self;
    /// `a + b` (wrapping for integers).
    fn add(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    /// `a * b` (wrapping for integers).
    fn mul(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    /// The larger of the two; for floats `f32::max`, so a NaN loses to a number.
    fn max(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    /// The smaller of the two; for floats `f32::min`, so a NaN loses to a number.
    fn min(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    /// `a / count`; integer division truncates toward zero.
    fn div_count(a: Self::Acc, count: usize) -> Self::Acc;
}

macro_rules! float_scalar {
    ($t:ty, $dtype:expr, $to:expr, $from:expr) => {
        impl Scalar for $t {
            const DTYPE: DataType = $dtype;
            type Acc = f32;
            #[inline(always)]
            fn to_acc(self) -> f32 {
                $to(self)
            }
            #[inline(always)]
            fn from_acc(acc: f32) -> Self {
                $from(acc)
            }
            #[inline(always)]
            fn add(a: f32, b: f32) -> f32 {
                a + b
            }
            #[inline(always)]
            fn mul(a: f32, b: f32) -> f32 {
                a * b
            }
            #[inline(always)]
            fn max(a: f32, b: f32) -> f32 {
                a.max(b)
            }
            #[inline(always)]
            fn min(a: f32, b: f32) -> f32 {
                a.min(b)
            }
            #[inline(always)]
            fn div_count(a: f32, count: usize) -> f32 {
                a / count as f32
            }
        }
    };
}

float_scalar!(f32, DataType::F32, |x: f32| x, |x: f32| x);
float_scalar!(bf16, DataType::BF16, bf16::to_f32, bf16::from_f32);
float_scalar!(f16, DataType::F16, f16::to_f32, f16::from_f32);

macro_rules! int_scalar {
    ($t:ty, $dtype:expr) => {
        impl Scalar for $t {
            const DTYPE: DataType = $dtype;
            type Acc = $t;
            #[inline(always)]
            fn to_acc(self) -> $t {
                self
            }
            #[inline(always)]
            fn from_acc(acc: $t) -> Self {
                acc
            }
            #[inline(always)]
            fn add(a: $t, b: $t) -> $t {
                a.wrapping_add(b)
            }
            #[inline(always)]
            fn mul(a: $t, b: $t) -> $t {
                a.wrapping_mul(b)
            }
            #[inline(always)]
            fn max(a: $t, b: $t) -> $t {
                Ord::max(a, b)
            }
            #[inline(always)]
            fn min(a: $t, b: $t) -> $t {
                Ord::min(a, b)
            }
            #[inline(always)]
            fn div_count(a: $t, count: usize) -> $t {
                // count is a world size (>= 1): the division cannot overflow.
                a / count as $t
            }
        }
    };
}

int_scalar!(i32, DataType::I32);
int_scalar!(i64, DataType::I64);
