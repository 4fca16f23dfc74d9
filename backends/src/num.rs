//! Element arithmetic with ONNX semantics: integers wrap, integer division by zero is an
//! error (not a panic), floats follow IEEE; half types compute through f32.

use half::{bf16, f16};

/// Arithmetic every numeric element type supports.
pub trait Num: Copy + PartialOrd + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// `a + b` (wrapping for integers).
    fn add(self, o: Self) -> Self;
    /// `a - b` (wrapping for integers).
    fn sub(self, o: Self) -> Self;
    /// `a * b` (wrapping for integers).
    fn mul(self, o: Self) -> Self;
    /// `a / b`; `None` for integer division by zero.
    fn div(self, o: Self) -> Option<Self>;
    /// `-a` (wrapping for integers; unsigned wrap too).
    fn neg(self) -> Self;
    /// `|a|`.
    fn abs(self) -> Self;
    /// `a ^ b`.
    fn pow(self, o: Self) -> Self;
    /// Widening conversion.
    fn to_f64(self) -> f64;
    /// Narrowing conversion (`as` semantics: saturating for floats to ints, NaN → 0).
    fn from_f64(x: f64) -> Self;
    /// NaN-propagating maximum.
    fn max_(self, o: Self) -> Self {
        if self.is_nan_() || o.is_nan_() {
            if self.is_nan_() {
                self
            } else {
                o
            }
        } else if o > self {
            o
        } else {
            self
        }
    }
    /// NaN-propagating minimum.
    fn min_(self, o: Self) -> Self {
        if self.is_nan_() || o.is_nan_() {
            if self.is_nan_() {
                self
            } else {
                o
            }
        } else if o < self {
            o
        } else {
            self
        }
    }
    /// True for NaN.
    fn is_nan_(self) -> bool {
        false
    }
}

macro_rules! int_num {
    ($($t:ty),*) => { $(
        impl Num for $t {
            const ZERO: Self = 0;
            const ONE: Self = 1;
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn sub(self, o: Self) -> Self { self.wrapping_sub(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn div(self, o: Self) -> Option<Self> { if o == 0 { None } else { Some(self.wrapping_div(o)) } }
            fn neg(self) -> Self { (0 as $t).wrapping_sub(self) }
            fn abs(self) -> Self { if self < (0 as $t) { self.neg() } else { self } }
            fn pow(self, o: Self) -> Self { (self as f64).powf(o as f64) as $t }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(x: f64) -> Self { x as $t }
        }
    )* };
}
int_num!(i8, i16, i32, i64, u8, u16, u32, u64);

macro_rules! float_num {
    ($($t:ty),*) => { $(
        impl Num for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn add(self, o: Self) -> Self { self + o }
            fn sub(self, o: Self) -> Self { self - o }
            fn mul(self, o: Self) -> Self { self * o }
            fn div(self, o: Self) -> Option<Self> { Some(self / o) }
            fn neg(self) -> Self { -self }
            fn abs(self) -> Self { self.abs() }
            fn pow(self, o: Self) -> Self { self.powf(o) }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(x: f64) -> Self { x as $t }
            fn is_nan_(self) -> bool { self.is_nan() }
        }
    )* };
}
float_num!(f32, f64);

macro_rules! half_num {
    ($($t:ty),*) => { $(
        impl Num for $t {
            const ZERO: Self = <$t>::ZERO;
            const ONE: Self = <$t>::ONE;
            fn add(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            fn sub(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() - o.to_f32()) }
            fn mul(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            fn div(self, o: Self) -> Option<Self> { Some(<$t>::from_f32(self.to_f32() / o.to_f32())) }
            fn neg(self) -> Self { -self }
            fn abs(self) -> Self { <$t>::from_f32(self.to_f32().abs()) }
            fn pow(self, o: Self) -> Self { <$t>::from_f32(self.to_f32().powf(o.to_f32())) }
            fn to_f64(self) -> f64 { self.to_f64() }
            fn from_f64(x: f64) -> Self { <$t>::from_f64(x) }
            fn is_nan_(self) -> bool { self.is_nan() }
        }
    )* };
}
half_num!(f16, bf16);

/// Floating-point functions (f16/bf16 compute in f32).
pub trait Float: Num {
    /// Converts to f32 for computing.
    fn f(self) -> f32;
    /// Applies an f32 function (exact types use their own precision).
    fn map32(self, f32op: fn(f32) -> f32, f64op: fn(f64) -> f64) -> Self;
}

impl Float for f32 {
    fn f(self) -> f32 {
        self
    }
    fn map32(self, f32op: fn(f32) -> f32, _: fn(f64) -> f64) -> Self {
        f32op(self)
    }
}

impl Float for f64 {
    fn f(self) -> f32 {
        self as f32
    }
    fn map32(self, _: fn(f32) -> f32, f64op: fn(f64) -> f64) -> Self {
        f64op(self)
    }
}

macro_rules! half_float {
    ($($t:ty),*) => { $(
        impl Float for $t {
            fn f(self) -> f32 { self.to_f32() }
            fn map32(self, f32op: fn(f32) -> f32, _: fn(f64) -> f64) -> Self { <$t>::from_f32(f32op(self.to_f32())) }
        }
    )* };
}
half_float!(f16, bf16);
