//! The decoded form of a PTX module: functions, their state-space variables and instructions.

use std::collections::HashMap;

/// A PTX fundamental type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ty {
    /// `.pred`
    Pred,
    /// `.b8` .. `.b64` (untyped bits), `.b128`.
    B(u8),
    /// `.u8` .. `.u64`
    U(u8),
    /// `.s8` .. `.s64`
    S(u8),
    /// `.f16`
    F16,
    /// `.f16x2`
    F16x2,
    /// `.bf16`
    Bf16,
    /// `.bf16x2`
    Bf16x2,
    /// `.f32`
    F32,
    /// `.f64`
    F64,
}

impl Ty {
    /// Parses a type suffix without the dot (`u32`, `f16x2`, ...).
    pub fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "pred" => Ty::Pred,
            "b8" => Ty::B(8),
            "b16" => Ty::B(16),
            "b32" => Ty::B(32),
            "b64" => Ty::B(64),
            "b128" => Ty::B(128),
            "u8" => Ty::U(8),
            "u16" => Ty::U(16),
            "u32" => Ty::U(32),
            "u64" => Ty::U(64),
            "s8" => Ty::S(8),
            "s16" => Ty::S(16),
            "s32" => Ty::S(32),
            "s64" => Ty::S(64),
            "f16" => Ty::F16,
            "f16x2" => Ty::F16x2,
            "bf16" => Ty::Bf16,
            "bf16x2" => Ty::Bf16x2,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            _ => return None,
        })
    }

    /// Width in bits (a predicate counts as 1).
    pub fn bits(self) -> u32 {
        match self {
            Ty::Pred => 1,
            Ty::B(n) | Ty::U(n) | Ty::S(n) => u32::from(n),
            Ty::F16 | Ty::Bf16 => 16,
            Ty::F16x2 | Ty::Bf16x2 | Ty::F32 => 32,
            Ty::F64 => 64,
        }
    }

    /// Size in bytes in memory (a predicate is not storable; 1 here).
    pub fn bytes(self) -> u64 {
        u64::from(self.bits().div_ceil(8))
    }

    /// Whether the type is signed integer.
    pub fn is_signed(self) -> bool {
        matches!(self, Ty::S(_))
    }

    /// Whether the type is a float (scalar or packed).
    pub fn is_float(self) -> bool {
        matches!(self, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2 | Ty::F32 | Ty::F64)
    }

    /// All-ones mask of the type's width.
    pub fn mask(self) -> u64 {
        width_mask(self.bits())
    }
}

/// All-ones in the low `bits` bits.
pub fn width_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Sign-extends the low `bits` bits of `v`.
pub fn sext(v: u64, bits: u32) -> i64 {
    if bits >= 64 {
        v as i64
    } else {
        let s = 64 - bits;
        ((v << s) as i64) >> s
    }
}

/// A PTX state space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// Generic addressing (no space named).
    Generic,
    /// `.global`
    Global,
    /// `.shared` (`.shared::cta`)
    Shared,
    /// `.local`
    Local,
    /// `.param` (kernel parameters)
    Param,
    /// `.const`
    Const,
}

impl Space {
    /// The name as written in PTX.
    pub fn name(self) -> &'static str {
        match self {
            Space::Generic => "generic",
            Space::Global => "global",
            Space::Shared => "shared",
            Space::Local => "local",
            Space::Param => "param",
            Space::Const => "const",
        }
    }
}

/// A special (read-only, per-thread) register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// `%tid.{x,y,z}`
    Tid(u8),
    /// `%ntid.{x,y,z}`
    Ntid(u8),
    /// `%ctaid.{x,y,z}`
    Ctaid(u8),
    /// `%nctaid.{x,y,z}`
    Nctaid(u8),
    /// `%laneid`
    LaneId,
    /// `%warpid`
    WarpId,
    /// `%nwarpid`
    NWarpId,
    /// `%lanemask_{eq,le,lt,ge,gt}` as 0..5
    LaneMask(u8),
    /// `%smid`, `%nsmid`, `%gridid` (all 0 / 1 here)
    Zero,
    /// `%clock`, `%clock64`, `%globaltimer`: the thread's step count.
    Clock,
    /// `%dynamic_smem_size`
    DynamicSmem,
    /// `%total_smem_size`
    TotalSmem,
}

/// An instruction operand after decoding.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A register (index into the thread's register file).
    Reg(u32),
    /// An immediate, already converted to the bits of the operand's type.
    Imm(u64),
    /// A special register.
    Special(Special),
    /// A memory address `[base + offset]`.
    Addr(Addr),
    /// A vector `{a, b, ...}`.
    Vec(Vec<Operand>),
    /// The sink `_`.
    Sink,
    /// A branch target (instruction index).
    Label(usize),
    /// The address of a variable in the current call frame's local memory (`.local` variables,
    /// `.func` parameters and return values, the `.param` variables of a call sequence): the
    /// frame's base plus this offset.
    Frame(u64),
}

/// The base of an address expression.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AddrBase {
    /// A register holding an address.
    Reg(u32),
    /// An absolute address (the variable's address in its space, or a literal).
    Abs(u64),
    /// A variable of the current call frame (see [`Operand::Frame`]).
    Frame(u64),
}

/// `[base + offset]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Addr {
    /// The base.
    pub base: AddrBase,
    /// The byte offset.
    pub offset: i64,
}

/// IEEE rounding mode of a float instruction or conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rnd {
    /// Nearest even.
    Rn,
    /// Toward zero.
    Rz,
    /// Toward minus infinity.
    Rm,
    /// Toward plus infinity.
    Rp,
    /// Nearest even, to an integer value (`.rni`).
    Rni,
    /// Toward zero, to an integer value (`.rzi`).
    Rzi,
    /// Down, to an integer value (`.rmi`).
    Rmi,
    /// Up, to an integer value (`.rpi`).
    Rpi,
}

/// Float modifiers common to arithmetic instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FMods {
    /// Rounding mode named (None: the default, nearest even).
    pub rnd: Option<Rnd>,
    /// `.ftz`: subnormal inputs and results flushed to sign-preserving zero.
    pub ftz: bool,
    /// `.sat`: results clamped to [0, 1].
    pub sat: bool,
}

/// Binary integer/float operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// add
    Add,
    /// sub
    Sub,
    /// mul (.lo for ints)
    Mul,
    /// mul.hi
    MulHi,
    /// mul.wide
    MulWide,
    /// div
    Div,
    /// rem
    Rem,
    /// min
    Min,
    /// max
    Max,
    /// and
    And,
    /// or
    Or,
    /// xor
    Xor,
    /// shl
    Shl,
    /// shr
    Shr,
}

/// Unary operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    /// neg
    Neg,
    /// abs
    Abs,
    /// not
    Not,
    /// cnot
    Cnot,
    /// popc
    Popc,
    /// clz
    Clz,
    /// brev
    Brev,
    /// bfind (.shiftamt when true)
    Bfind(bool),
}

/// The approximate (and correctly-rounded) float functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FFunc {
    /// ex2
    Ex2,
    /// lg2
    Lg2,
    /// rcp
    Rcp,
    /// rsqrt
    Rsqrt,
    /// sqrt
    Sqrt,
    /// sin
    Sin,
    /// cos
    Cos,
    /// tanh
    Tanh,
}

/// Comparison operators of setp/set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// eq
    Eq,
    /// ne
    Ne,
    /// lt
    Lt,
    /// le
    Le,
    /// gt
    Gt,
    /// ge
    Ge,
    /// lo (unsigned <)
    Lo,
    /// ls
    Ls,
    /// hi
    Hi,
    /// hs
    Hs,
    /// equ (unordered or equal)
    Equ,
    /// neu
    Neu,
    /// ltu
    Ltu,
    /// leu
    Leu,
    /// gtu
    Gtu,
    /// geu
    Geu,
    /// num (both not NaN)
    Num,
    /// nan (either NaN)
    Nan,
}

/// Boolean combiner of setp's optional third operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoolOp {
    /// and
    And,
    /// or
    Or,
    /// xor
    Xor,
}

/// Atomic operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomOp {
    /// add
    Add,
    /// min
    Min,
    /// max
    Max,
    /// and
    And,
    /// or
    Or,
    /// xor
    Xor,
    /// exch
    Exch,
    /// cas
    Cas,
    /// inc (wrapping at b)
    Inc,
    /// dec
    Dec,
}

/// Shuffle modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShflMode {
    /// up
    Up,
    /// down
    Down,
    /// bfly
    Bfly,
    /// idx
    Idx,
}

/// vote modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteMode {
    /// all
    All,
    /// any
    Any,
    /// uni
    Uni,
    /// ballot
    Ballot,
}

/// A decoded operation; operand meanings are per variant (see the executor).
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `mov` (incl. pack/unpack through vector operands).
    Mov(Ty),
    /// `ld{.space}{.vN}.ty`
    Ld {
        /// state space
        space: Space,
        /// element type
        ty: Ty,
    },
    /// `st{.space}{.vN}.ty`
    St {
        /// state space
        space: Space,
        /// element type
        ty: Ty,
    },
    /// `cvta{.to}.space.size`
    Cvta {
        /// `.to` (generic -> space) when true
        to: bool,
        /// the space
        space: Space,
    },
    /// Integer binary op.
    IntBin(BinOp, Ty, bool),
    /// Float binary op (add/sub/mul/div/min/max).
    FloatBin(BinOp, Ty, FMods),
    /// `mad.{lo,hi,wide}` integer.
    IntMad(BinOp, Ty),
    /// `fma` / `mad` float.
    Fma(Ty, FMods),
    /// Integer unary.
    IntUn(UnOp, Ty),
    /// Float neg/abs.
    FloatUn(UnOp, Ty, FMods),
    /// Float functions.
    FFunc(FFunc, Ty, FMods),
    /// `setp.cmp{.bop}.ty`
    Setp(Cmp, Option<BoolOp>, Ty, bool),
    /// `set.cmp{.bop}.dty.sty`
    Set(Cmp, Option<BoolOp>, Ty, Ty, bool),
    /// `selp.ty`
    Selp(Ty),
    /// `cvt{.rnd}{.ftz}{.sat}.dty.sty`
    Cvt {
        /// destination type
        dst: Ty,
        /// source type
        src: Ty,
        /// modifiers
        mods: FMods,
    },
    /// `bfe.ty`
    Bfe(Ty),
    /// `bfi.ty`
    Bfi(Ty),
    /// `prmt.b32` (default mode only)
    Prmt,
    /// `lop3.b32`
    Lop3,
    /// `shf.{l,r}.{wrap,clamp}.b32` (left, clamp)
    Shf(bool, bool),
    /// `bra`
    Bra,
    /// `ret`
    Ret,
    /// `exit`
    Exit,
    /// `bar.sync`/`barrier.sync` (wait=true) or `.arrive` (wait=false)
    Bar {
        /// waits for the barrier to complete
        wait: bool,
    },
    /// `bar.warp.sync mask`
    WarpSync,
    /// `shfl.sync`
    Shfl(ShflMode),
    /// `vote.sync`
    Vote(VoteMode),
    /// `atom` (has_dst) / `red`
    Atom {
        /// state space
        space: Space,
        /// operation
        op: AtomOp,
        /// element type
        ty: Ty,
        /// writes the old value to operand 0
        has_dst: bool,
    },
    /// `membar`/`fence`/`nanosleep` and the like: no effect in this model.
    Nop,
    /// `activemask.b32`
    ActiveMask,
    /// `trap`
    Trap,
    /// `mma.sync.aligned.m16n8k{8,16}.row.col.f32.{f16,bf16}.{f16,bf16}.f32`
    Mma {
        /// K of the shape (8 or 16).
        k: u8,
        /// bf16 inputs (else f16).
        bf16: bool,
    },
    /// `ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16`
    Ldmatrix {
        /// Number of 8x8 matrices.
        num: u8,
        /// `.trans`
        trans: bool,
        /// state space of the address
        space: Space,
    },
    /// `cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size | ignore-src}`: read
    /// at issue, pending in the thread's current group until a wait covers it.
    CpAsync {
        /// The fourth operand is the `ignore-src` predicate (else `src-size`).
        ignore_src: bool,
    },
    /// `cp.async.commit_group`
    CpAsyncCommit,
    /// `cp.async.wait_group N`, or `wait_all` (a commit, then a wait for every group).
    CpAsyncWait {
        /// Groups that may stay pending.
        n: u8,
        /// `wait_all`
        all: bool,
    },
    /// `redux.sync.op.type d, a, membermask`
    Redux(AtomOp, Ty),
    /// `match.{any,all}.sync.type d[|p], a, membermask` (all when true)
    Match(bool, Ty),
    /// `call{.uni} (rets), func, (args)`: operands are the caller-frame addresses
    /// ([`Operand::Frame`]) of the return-value variables (the first `nret`) and the arguments.
    Call {
        /// Index into the linked entry's [`Function::callees`] (before linking: into the
        /// function's own [`Function::call_names`]).
        callee: u32,
        /// How many of the operands are return values.
        nret: u8,
    },
    /// `bar.red.{popc,and,or}` / `barrier.red...`: d, a{, b}, {!}c
    BarRed(BarRedOp),
    /// f16/bf16 (scalar or x2) add/sub/mul/min/max, and fma when the op is `Mul` with 3 sources.
    HalfArith(BinOp, Ty, FMods, bool),
    /// f16/bf16 (scalar or x2) neg/abs.
    HalfUn(UnOp, Ty),
}

/// The reductions of `bar.red`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarRedOp {
    /// `.popc.u32`: how many threads had c true.
    Popc,
    /// `.and.pred`
    And,
    /// `.or.pred`
    Or,
}

/// One decoded instruction.
#[derive(Debug, Clone, PartialEq)]
pub struct Inst {
    /// 1-based PTX line.
    pub line: u32,
    /// Guard predicate: (register, negated).
    pub guard: Option<(u32, bool)>,
    /// The operation.
    pub op: Op,
    /// Operands (destinations first, as written).
    pub args: Vec<Operand>,
    /// Vector width of ld/st (1 for scalar).
    pub vec: u8,
    /// A second destination (`d|p` of shfl/setp), if written.
    pub pdst: Option<u32>,
}

/// A variable in a state space.
#[derive(Debug, Clone)]
pub struct Var {
    /// Its name.
    pub name: String,
    /// Its size in bytes (0 for an `extern` array).
    pub size: u64,
    /// Its alignment.
    pub align: u64,
    /// Its initialiser bytes (module `.global`/`.const`).
    pub init: Option<Vec<u8>>,
}

/// A kernel parameter.
#[derive(Debug, Clone)]
pub struct Param {
    /// Its name.
    pub name: String,
    /// Element type.
    pub ty: Ty,
    /// Size in bytes.
    pub size: u64,
    /// Offset in the parameter block.
    pub offset: u64,
}

/// A device function reachable from an entry, as linked into the entry's instructions.
#[derive(Debug, Clone)]
pub struct Callee {
    /// Its name.
    pub name: String,
    /// Index of its first instruction in the entry's instructions.
    pub start: u32,
    /// Its registers: `reg_count` registers from `reg_offset` in the thread's register file.
    pub reg_offset: u32,
    /// How many registers it declares.
    pub reg_count: u32,
    /// Bytes of its call frame in local memory (return values, parameters, `.local`
    /// variables and the `.param` variables of its own call sequences).
    pub frame_bytes: u64,
    /// Alignment of its frame.
    pub frame_align: u64,
    /// Frame offset and size of each parameter.
    pub params: Vec<(u64, u64)>,
    /// Frame offset and size of each return value.
    pub rets: Vec<(u64, u64)>,
}

/// An `.entry` function, or a `.func` device function. An entry as stored in
/// [`Module::entries`] is linked: the device functions it calls (transitively) are appended to
/// its instructions and registers, and listed in `callees`.
#[derive(Debug, Clone)]
pub struct Function {
    /// Its name.
    pub name: String,
    /// Line of its declaration.
    pub line: u32,
    /// Parameters in order.
    pub params: Vec<Param>,
    /// Bytes of the parameter block.
    pub param_bytes: u64,
    /// Number of registers (predicates included).
    pub num_regs: u32,
    /// Declared bit width of each register.
    pub reg_bits: Vec<u32>,
    /// Register names (for messages).
    pub reg_names: Vec<String>,
    /// Bytes of static shared memory (function and module variables); the dynamic
    /// (`extern .shared`) region starts at `dynamic_shared_offset`.
    pub static_shared: u64,
    /// Where dynamic shared memory starts.
    pub dynamic_shared_offset: u64,
    /// Bytes of local memory per thread.
    pub local_bytes: u64,
    /// The instructions.
    pub insts: Vec<Inst>,
    /// `.reqntid`/`.maxntid` if given.
    pub max_threads: Option<u32>,
    /// Return values of a `.func` (frame offsets), in order.
    pub rets: Vec<Param>,
    /// Largest alignment of a variable in the call frame.
    pub frame_align: u64,
    /// The names the function's `call` instructions name, indexed by their `callee` before
    /// linking.
    pub call_names: Vec<String>,
    /// After linking (entries only): the device functions reachable from the entry.
    pub callees: Vec<Callee>,
}

/// A parsed module.
#[derive(Debug, Clone, Default)]
pub struct Module {
    /// `.version`
    pub version: String,
    /// `.target`
    pub target: String,
    /// Entry functions by name, linked with the device functions they call.
    pub entries: HashMap<String, Function>,
    /// Device functions (`.func` with a body) by name, unlinked.
    pub funcs: HashMap<String, Function>,
    /// Module `.global` and `.const` variables: space, variable, address.
    pub globals: Vec<(Space, Var, u64)>,
}
