//! Parsing PTX text into a [`Module`]: directives, entry functions, declarations, and the
//! decoding of each instruction into an [`Op`] with resolved operands.

use std::collections::HashMap;

use crate::ir::*;
use crate::lex::{lex, Tok, Token};
use crate::Error;

/// Generic-address window of shared memory (`cvta.shared` adds it).
pub const SHARED_WINDOW: u64 = 0x0000_7000_0000_0000;
/// Generic-address window of local memory.
pub const LOCAL_WINDOW: u64 = 0x0000_7100_0000_0000;
/// Generic-address window of the kernel parameters (`cvta.param`).
pub const PARAM_WINDOW: u64 = 0x0000_7200_0000_0000;
/// Width of each window.
pub const WINDOW_SIZE: u64 = 1 << 32;
/// Where module `.global`/`.const` variables live.
pub const MODULE_GLOBAL_BASE: u64 = 0x0000_0a00_0000_0000;
/// A placeholder for the dynamic shared base before the function's static size is known.
const DYN_MARK: u64 = 0x4000_0000_0000_0000;

fn perr(line: u32, message: impl Into<String>) -> Error {
    Error::Parse { line: line as usize, message: message.into() }
}

/// A number as written.
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i128),
    F32(u32),
    F64(u64),
}

fn parse_num(s: &str, line: u32) -> Result<Num, Error> {
    let bad = || perr(line, format!("bad number {s:?}"));
    let t = s.trim_end_matches(['U', 'u']);
    if let Some(h) = t.strip_prefix("0f").or_else(|| t.strip_prefix("0F")) {
        return u32::from_str_radix(h, 16).map(Num::F32).map_err(|_| bad());
    }
    if let Some(h) = t.strip_prefix("0d").or_else(|| t.strip_prefix("0D")) {
        return u64::from_str_radix(h, 16).map(Num::F64).map_err(|_| bad());
    }
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u128::from_str_radix(h, 16).map(|v| Num::Int(v as i128)).map_err(|_| bad());
    }
    if let Some(b) = t.strip_prefix("0b").or_else(|| t.strip_prefix("0B")) {
        return u128::from_str_radix(b, 2).map(|v| Num::Int(v as i128)).map_err(|_| bad());
    }
    if t.contains('.') || t.contains('e') || t.contains('E') {
        return t.parse::<f64>().map(|f| Num::F64(f.to_bits())).map_err(|_| bad());
    }
    if t.len() > 1 && t.starts_with('0') {
        return u128::from_str_radix(&t[1..], 8).map(|v| Num::Int(v as i128)).map_err(|_| bad());
    }
    t.parse::<i128>().map(Num::Int).map_err(|_| bad())
}

fn negate(n: Num) -> Num {
    match n {
        Num::Int(i) => Num::Int(-i),
        Num::F32(b) => Num::F32(b ^ 0x8000_0000),
        Num::F64(b) => Num::F64(b ^ (1 << 63)),
    }
}

/// The bits of an immediate as an operand of type `ty`.
fn imm_bits(n: Num, ty: Ty) -> u64 {
    match (n, ty) {
        (Num::Int(i), Ty::F32) => u64::from((i as f32).to_bits()),
        (Num::Int(i), Ty::F64) => (i as f64).to_bits(),
        (Num::Int(i), Ty::F16) => u64::from(crate::float::f64_to_f16(i as f64, Rnd::Rn)),
        (Num::Int(i), Ty::Bf16) => u64::from(crate::float::f64_to_bf16(i as f64, Rnd::Rn)),
        (Num::Int(i), t) => (i as u64) & t.mask(),
        (Num::F32(b), Ty::F64) => f64::from(f32::from_bits(b)).to_bits(),
        (Num::F32(b), _) => u64::from(b),
        (Num::F64(b), Ty::F32) => u64::from((f64::from_bits(b) as f32).to_bits()),
        (Num::F64(b), Ty::F16) => u64::from(crate::float::f64_to_f16(f64::from_bits(b), Rnd::Rn)),
        (Num::F64(b), Ty::Bf16) => u64::from(crate::float::f64_to_bf16(f64::from_bits(b), Rnd::Rn)),
        (Num::F64(b), Ty::F64) => b,
        (Num::F64(b), t) => b & t.mask(),
    }
}

/// An operand before decoding.
#[derive(Debug, Clone)]
enum Raw {
    Name(String),
    Num(Num),
    Addr(Option<String>, i128),
    Vec(Vec<Raw>),
    Not(Box<Raw>),
    NameOff(String, i128),
}

struct Cursor {
    toks: Vec<Token>,
    pos: usize,
}

impl Cursor {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }
    fn peek_at(&self, k: usize) -> Option<&Tok> {
        self.toks.get(self.pos + k).map(|t| &t.tok)
    }
    fn line(&self) -> u32 {
        self.toks.get(self.pos).or(self.toks.last()).map_or(0, |t| t.line)
    }
    fn next(&mut self) -> Result<Tok, Error> {
        let t = self.toks.get(self.pos).ok_or_else(|| perr(self.line(), "unexpected end of PTX"))?;
        self.pos += 1;
        Ok(t.tok.clone())
    }
    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }
    fn eat_punct(&mut self, c: char) -> bool {
        if self.is_punct(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect_punct(&mut self, c: char) -> Result<(), Error> {
        let line = self.line();
        match self.next()? {
            Tok::Punct(p) if p == c => Ok(()),
            t => Err(perr(line, format!("expected '{c}', found {t:?}"))),
        }
    }
    fn ident(&mut self) -> Result<String, Error> {
        let line = self.line();
        match self.next()? {
            Tok::Ident(s) => Ok(s),
            t => Err(perr(line, format!("expected a name, found {t:?}"))),
        }
    }
    fn number(&mut self) -> Result<Num, Error> {
        let line = self.line();
        let neg = self.eat_punct('-');
        match self.next()? {
            Tok::Num(s) => parse_num(&s, line).map(|n| if neg { negate(n) } else { n }),
            t => Err(perr(line, format!("expected a number, found {t:?}"))),
        }
    }
    fn int(&mut self) -> Result<i128, Error> {
        let line = self.line();
        match self.number()? {
            Num::Int(i) => Ok(i),
            _ => Err(perr(line, "expected an integer")),
        }
    }
    /// Skips tokens through the next ';'.
    fn skip_statement(&mut self) -> Result<(), Error> {
        while !self.eat_punct(';') {
            self.next()?;
        }
        Ok(())
    }
    /// Skips the rest of the current line.
    fn skip_line(&mut self, line: u32) {
        while self.pos < self.toks.len() && self.toks[self.pos].line == line {
            self.pos += 1;
        }
    }
}

/// A `.reg`/`.shared`/`.local`/`.global` declaration's pieces.
struct Decl {
    align: Option<u64>,
    ty: Ty,
    /// (name, count of a `<N>` range, array length)
    names: Vec<(String, Option<u64>, Option<u64>)>,
    init: Option<Vec<i128>>,
}

fn parse_decl(c: &mut Cursor) -> Result<Decl, Error> {
    let mut align = None;
    let mut ty = None;
    loop {
        let line = c.line();
        match c.peek() {
            Some(Tok::Ident(s)) if s.starts_with('.') => {
                let s = s.clone();
                c.pos += 1;
                if s == ".align" {
                    let a = c.int()? as u64;
                    if !a.is_power_of_two() || a > 1 << 16 {
                        return Err(perr(line, format!(".align {a} is not a power of two up to 65536")));
                    }
                    align = Some(a);
                } else if let Some(t) = Ty::parse(&s[1..]) {
                    ty = Some(t);
                } else if s.starts_with(".v") {
                    return Err(perr(line, format!("vector variables ({s}) are not supported")));
                }
                // other qualifiers (.ptr, .attribute...) ignored
            }
            _ => break,
        }
    }
    let line = c.line();
    let ty = ty.ok_or_else(|| perr(line, "declaration without a type"))?;
    let mut names = Vec::new();
    let mut init = None;
    loop {
        let name = c.ident()?;
        let mut range = None;
        let mut array = None;
        if c.eat_punct('<') {
            range = Some(c.int()? as u64);
            c.expect_punct('>')?;
        }
        while c.eat_punct('[') {
            let line = c.line();
            let n = if c.is_punct(']') { 0 } else { c.int()? as u64 };
            c.expect_punct(']')?;
            let len = array.unwrap_or(1u64).checked_mul(n).filter(|&l| l <= MAX_VARIABLE_BYTES);
            array = Some(len.ok_or_else(|| too_big(&name, line))?);
        }
        if c.eat_punct('=') {
            let mut vals = Vec::new();
            if c.eat_punct('{') {
                while !c.eat_punct('}') {
                    if c.eat_punct(',') || c.eat_punct('{') || c.eat_punct('}') {
                        continue;
                    }
                    match c.number()? {
                        Num::Int(i) => vals.push(i),
                        Num::F32(b) => vals.push(i128::from(b)),
                        Num::F64(b) => vals.push(i128::from(b)),
                    }
                }
            } else {
                match c.number()? {
                    Num::Int(i) => vals.push(i),
                    Num::F32(b) => vals.push(i128::from(b)),
                    Num::F64(b) => vals.push(i128::from(b)),
                }
            }
            init = Some(vals);
        }
        names.push((name, range, array));
        if !c.eat_punct(',') {
            break;
        }
    }
    c.expect_punct(';')?;
    Ok(Decl { align, ty, names, init })
}

fn var_from_decl(d: &Decl, idx: usize, line: u32) -> Result<Var, Error> {
    let (name, _, array) = &d.names[idx];
    let elem = d.ty.bytes();
    let size = elem.checked_mul(array.unwrap_or(1)).filter(|&s| s <= MAX_VARIABLE_BYTES);
    let size = size.ok_or_else(|| too_big(name, line))?;
    let init = match &d.init {
        Some(vals) => {
            let mut bytes = Vec::with_capacity(size as usize);
            for v in vals {
                let b = (*v as u64).to_le_bytes();
                bytes.extend_from_slice(&b[..elem as usize]);
            }
            if bytes.len() as u64 > size {
                return Err(perr(line, format!("initialiser of {name} is longer than the variable")));
            }
            bytes.resize(size as usize, 0);
            Some(bytes)
        }
        None => None,
    };
    Ok(Var { name: name.clone(), size, align: d.align.unwrap_or(elem).max(1), init })
}

/// The largest variable (array, parameter) the simulator accepts: 1 GiB, far above any
/// GPU's shared or per-thread local memory, so a huge declaration is a typed error rather
/// than an allocation that aborts the process.
pub const MAX_VARIABLE_BYTES: u64 = 1 << 30;

fn too_big(name: &str, line: u32) -> Error {
    perr(line, format!("{name} is larger than the simulator's limit of {MAX_VARIABLE_BYTES} bytes per variable"))
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a.max(1)) * a.max(1)
}

/// Module-level symbols every function sees.
#[derive(Default)]
struct ModuleSyms {
    /// Module shared variables: (name, offset) and total bytes.
    shared: Vec<(String, u64)>,
    shared_bytes: u64,
    /// The `extern .shared` name (dynamic shared memory), with its alignment.
    dynamic: Vec<(String, u64)>,
    /// Module global/const variable addresses.
    globals: HashMap<String, u64>,
    next_global: u64,
    global_base: u64,
    /// Device functions declared or defined so far.
    funcs: std::collections::HashSet<String>,
}

/// Parses PTX text.
pub fn parse_module(text: &str, global_base: u64) -> Result<Module, Error> {
    let mut c = Cursor { toks: lex(text)?, pos: 0 };
    let mut module = Module::default();
    let mut syms = ModuleSyms { next_global: global_base, global_base, ..Default::default() };
    while let Some(tok) = c.peek().cloned() {
        let line = c.line();
        match tok {
            Tok::Ident(s) => match s.as_str() {
                ".version" => {
                    c.pos += 1;
                    if let Some(Tok::Num(v)) = c.peek() {
                        module.version = v.clone();
                    }
                    c.skip_line(line);
                }
                ".target" => {
                    c.pos += 1;
                    if let Some(Tok::Ident(v)) = c.peek() {
                        module.target = v.clone();
                    }
                    c.skip_line(line);
                }
                ".address_size" => {
                    c.pos += 1;
                    let n = c.int()?;
                    if n != 64 {
                        return Err(perr(line, format!(".address_size {n} is not supported (64 only)")));
                    }
                }
                ".file" | ".section" => c.skip_line(line),
                ".visible" | ".weak" | ".entry" | ".func" | ".extern" | ".global" | ".const" | ".shared" => {
                    top_level(&mut c, &mut module, &mut syms)?
                }
                _ => return Err(perr(line, format!("unexpected {s} at module level"))),
            },
            t => return Err(perr(line, format!("unexpected {t:?} at module level"))),
        }
    }
    let Module { entries, funcs, .. } = &mut module;
    for entry in entries.values_mut() {
        link(entry, funcs)?;
    }
    Ok(module)
}

/// The device functions linked into one entry so far.
struct Linker<'a> {
    funcs: &'a HashMap<String, Function>,
    callees: Vec<Callee>,
    index: HashMap<String, u32>,
    /// Callees whose instructions are not yet appended.
    pending: Vec<u32>,
}

impl Linker<'_> {
    /// Resolves a `call` of `name` to its index in the callee table (adding it when new).
    fn resolve(&mut self, name: &str, line: u32, nargs: usize, nret: usize) -> Result<u32, Error> {
        let f = self.funcs.get(name).ok_or_else(|| {
            unsupported(
                &format!("call to {name}, which has no body in this module (external functions are not simulated)"),
                line,
            )
        })?;
        if nargs != f.params.len() || nret > f.rets.len() {
            return Err(perr(
                line,
                format!(
                    "call to {name} with {nargs} arguments and {nret} return values; it takes {} and returns {}",
                    f.params.len(),
                    f.rets.len()
                ),
            ));
        }
        if let Some(&i) = self.index.get(name) {
            return Ok(i);
        }
        let i = self.callees.len() as u32;
        self.callees.push(Callee {
            name: name.to_string(),
            start: 0,
            reg_offset: 0,
            reg_count: f.num_regs,
            frame_bytes: f.local_bytes,
            frame_align: f.frame_align,
            params: f.params.iter().map(|p| (p.offset, p.size)).collect(),
            rets: f.rets.iter().map(|p| (p.offset, p.size)).collect(),
        });
        self.index.insert(name.to_string(), i);
        self.pending.push(i);
        Ok(i)
    }

    /// Points a `call` (whose callee indexes `names`) at the callee table.
    fn fix_call(&mut self, inst: &mut Inst, names: &[String]) -> Result<(), Error> {
        if let Op::Call { callee, nret } = &mut inst.op {
            let n = usize::from(*nret);
            *callee = self.resolve(&names[*callee as usize], inst.line, inst.args.len() - n, n)?;
        }
        Ok(())
    }
}

/// Appends every device function an entry calls (transitively) to the entry's instructions,
/// with its registers after the entry's, so one thread's registers hold one frame of each
/// function; a recursive call saves the callee's registers on the thread's call stack.
fn link(entry: &mut Function, funcs: &HashMap<String, Function>) -> Result<(), Error> {
    let mut linker = Linker { funcs, callees: Vec::new(), index: HashMap::new(), pending: Vec::new() };
    let names = std::mem::take(&mut entry.call_names);
    for inst in &mut entry.insts {
        linker.fix_call(inst, &names)?;
    }
    let dyn_base = entry.dynamic_shared_offset;
    // The end of a body returns (an entry exits) rather than running into the next function.
    let end = |f: &Function, op: Op| Inst {
        line: f.insts.last().map_or(f.line, |i| i.line),
        guard: None,
        op,
        args: Vec::new(),
        vec: 1,
        pdst: None,
    };
    if !linker.pending.is_empty() {
        entry.insts.push(end(entry, Op::Exit));
    }
    while let Some(i) = linker.pending.pop() {
        let f = &funcs[&linker.callees[i as usize].name];
        let start = entry.insts.len() as u32;
        let roff = entry.reg_bits.len() as u32;
        entry.reg_bits.extend_from_slice(&f.reg_bits);
        entry.reg_names.extend(f.reg_names.iter().map(|r| format!("{}:{r}", f.name)));
        for inst in &f.insts {
            let mut inst = inst.clone();
            if let Some((p, _)) = &mut inst.guard {
                *p += roff;
            }
            if let Some(p) = &mut inst.pdst {
                *p += roff;
            }
            for a in &mut inst.args {
                relocate(a, roff, start as usize, dyn_base);
            }
            linker.fix_call(&mut inst, &f.call_names)?;
            entry.insts.push(inst);
        }
        entry.insts.push(end(f, Op::Ret));
        let c = &mut linker.callees[i as usize];
        c.start = start;
        c.reg_offset = roff;
    }
    entry.num_regs = entry.reg_bits.len() as u32;
    entry.callees = linker.callees;
    Ok(())
}

/// Moves a device function's operand into the entry: registers after `roff`, branch targets
/// after `start`, the dynamic shared base at the entry's.
fn relocate(o: &mut Operand, roff: u32, start: usize, dyn_base: u64) {
    match o {
        Operand::Reg(r) => *r += roff,
        Operand::Addr(Addr { base: AddrBase::Reg(r), .. }) => *r += roff,
        Operand::Label(l) => *l += start,
        Operand::Vec(v) => v.iter_mut().for_each(|x| relocate(x, roff, start, dyn_base)),
        _ => patch_dyn(o, dyn_base),
    }
}

fn top_level(c: &mut Cursor, module: &mut Module, syms: &mut ModuleSyms) -> Result<(), Error> {
    let line = c.line();
    let mut is_extern = false;
    loop {
        let s = match c.peek() {
            Some(Tok::Ident(s)) => s.clone(),
            t => return Err(perr(line, format!("unexpected {t:?}"))),
        };
        match s.as_str() {
            ".visible" | ".weak" => c.pos += 1,
            ".extern" => {
                is_extern = true;
                c.pos += 1;
            }
            ".entry" => {
                c.pos += 1;
                let (_, f) = parse_function(c, syms, true)?;
                if let Some(f) = f {
                    module.entries.insert(f.name.clone(), f);
                }
                return Ok(());
            }
            ".func" => {
                c.pos += 1;
                // A device function: a prototype (`;`, e.g. an `.extern` one such as vprintf) is
                // skipped; a body is decoded and linked into the entries that call it.
                let (name, f) = parse_function(c, syms, false)?;
                syms.funcs.insert(name);
                if let Some(f) = f {
                    if module.funcs.contains_key(&f.name) {
                        return Err(perr(f.line, format!("function {} is defined twice", f.name)));
                    }
                    module.funcs.insert(f.name.clone(), f);
                }
                return Ok(());
            }
            ".global" | ".const" | ".shared" => {
                c.pos += 1;
                let space = match s.as_str() {
                    ".global" => Space::Global,
                    ".const" => Space::Const,
                    _ => Space::Shared,
                };
                let d = parse_decl(c)?;
                for i in 0..d.names.len() {
                    let v = var_from_decl(&d, i, line)?;
                    if space == Space::Shared {
                        if is_extern || v.size == 0 {
                            syms.dynamic.push((v.name.clone(), v.align));
                        } else {
                            let off = align_up(syms.shared_bytes, v.align);
                            syms.shared.push((v.name.clone(), off));
                            syms.shared_bytes = off + v.size;
                        }
                    } else {
                        let addr = align_up(syms.next_global, v.align.max(256));
                        syms.next_global = addr + v.size.max(1);
                        if syms.next_global - syms.global_base > MAX_VARIABLE_BYTES {
                            return Err(perr(
                                line,
                                format!(
                                    "the module's .global/.const variables exceed the simulator's limit of {MAX_VARIABLE_BYTES} bytes"
                                ),
                            ));
                        }
                        syms.globals.insert(v.name.clone(), addr);
                        module.globals.push((space, v, addr));
                    }
                }
                return Ok(());
            }
            _ => return Err(perr(line, format!("unexpected {s} at module level"))),
        }
    }
}

/// Per-function decoding state.
struct FnCtx<'a> {
    syms: &'a ModuleSyms,
    /// Registers: declared lazily (a `%r<N>` range gets an index per name on first use), so
    /// a range of any size costs nothing until its names are used.
    regs: std::cell::RefCell<Regs>,
    /// Function-local symbols: name -> address in its space.
    locals: HashMap<String, u64>,
    labels: HashMap<String, usize>,
    fixups: Vec<(usize, usize, String, u32)>,
    insts: Vec<Inst>,
    /// Variables of the call frame (local memory): name -> frame offset.
    frame: HashMap<String, u64>,
    /// Bytes of the frame so far, and its largest alignment.
    frame_bytes: u64,
    frame_align: u64,
    /// An `.entry` (else a `.func`).
    entry: bool,
    /// Names called by `call` instructions, indexed by their `callee`.
    call_names: Vec<String>,
}

/// One `{ }` scope's registers: names declared one by one, and `%name<N>` ranges.
#[derive(Default)]
struct RegScope {
    names: HashMap<String, u32>,
    /// (prefix, count, bits) of each `.reg .ty prefix<count>;`
    ranges: Vec<(String, u64, u32)>,
}

/// The registers of a function being decoded.
#[derive(Default)]
struct Regs {
    scopes: Vec<RegScope>,
    bits: Vec<u32>,
    names: Vec<String>,
}

impl Regs {
    fn declare(&mut self, name: String, bits: u32) -> u32 {
        let idx = self.bits.len() as u32;
        self.bits.push(bits);
        self.names.push(name.clone());
        self.scopes.last_mut().expect("a scope").names.insert(name, idx);
        idx
    }

    /// The register `name` resolves to in the innermost scope that declares it; a name of a
    /// range gets its register on first use (in the range's scope).
    fn lookup(&mut self, name: &str) -> Option<u32> {
        for si in (0..self.scopes.len()).rev() {
            if let Some(&r) = self.scopes[si].names.get(name) {
                return Some(r);
            }
            let in_range = self.scopes[si].ranges.iter().find_map(|(prefix, count, bits)| {
                let digits = name.strip_prefix(prefix.as_str())?;
                let canonical = !digits.is_empty()
                    && digits.bytes().all(|b| b.is_ascii_digit())
                    && (digits == "0" || !digits.starts_with('0'));
                let i: u64 = if canonical { digits.parse().ok()? } else { return None };
                (i < *count).then_some(*bits)
            });
            if let Some(bits) = in_range {
                let idx = self.bits.len() as u32;
                self.bits.push(bits);
                self.names.push(name.to_string());
                self.scopes[si].names.insert(name.to_string(), idx);
                return Some(idx);
            }
        }
        None
    }
}

impl FnCtx<'_> {
    fn declare_reg(&mut self, name: String, bits: u32) {
        self.regs.get_mut().declare(name, bits);
    }
    fn declare_reg_range(&mut self, prefix: String, count: u64, bits: u32) {
        self.regs.get_mut().scopes.last_mut().expect("a scope").ranges.push((prefix, count, bits));
    }
    fn reg(&self, name: &str) -> Option<u32> {
        self.regs.borrow_mut().lookup(name)
    }
    /// Whether `name` is a predicate register.
    fn is_pred(&self, name: &str) -> bool {
        self.reg(name).is_some_and(|r| self.regs.borrow().bits[r as usize] == 1)
    }
    /// Allocates a variable in the call frame.
    fn frame_var(&mut self, name: String, size: u64, align: u64) -> u64 {
        let off = align_up(self.frame_bytes, align);
        self.frame_bytes = off + size;
        self.frame_align = self.frame_align.max(align);
        self.frame.insert(name, off);
        off
    }
    fn symbol(&self, name: &str) -> Option<u64> {
        if let Some(v) = self.locals.get(name) {
            return Some(*v);
        }
        if let Some((_, off)) = self.syms.shared.iter().find(|(n, _)| n == name) {
            return Some(*off);
        }
        if self.syms.dynamic.iter().any(|(n, _)| n == name) {
            return Some(DYN_MARK);
        }
        self.syms.globals.get(name).copied()
    }
}

/// A parameter list `( .param .ty name, ... )` (the '(' already read): (param, alignment).
fn parse_params(c: &mut Cursor) -> Result<Vec<(Param, u64)>, Error> {
    let mut params = Vec::new();
    while !c.eat_punct(')') {
        if c.eat_punct(',') {
            continue;
        }
        let pl = c.line();
        let kw = c.ident()?;
        if kw == ".reg" {
            return Err(unsupported(".reg parameters of a .func", pl));
        }
        if kw != ".param" {
            return Err(perr(pl, format!("expected .param, found {kw}")));
        }
        let mut align = None;
        let mut ty = None;
        while let Some(Tok::Ident(s)) = c.peek() {
            if !s.starts_with('.') {
                break;
            }
            let s = s.clone();
            c.pos += 1;
            if s == ".align" {
                align = Some(c.int()? as u64);
            } else if let Some(t) = Ty::parse(&s[1..]) {
                ty = Some(t);
            }
            // `.ptr.global.align 4` and the like: pointer annotations, ignored.
        }
        let ty = ty.ok_or_else(|| perr(pl, "parameter without a type"))?;
        let pname = c.ident()?;
        let mut count = 1u64;
        if c.eat_punct('[') {
            count = c.int()? as u64;
            c.expect_punct(']')?;
        }
        let size = ty.bytes().checked_mul(count).filter(|&s| s <= MAX_VARIABLE_BYTES);
        let size = size.ok_or_else(|| too_big(&pname, pl))?;
        params.push((Param { name: pname, ty, size, offset: 0 }, align.unwrap_or(ty.bytes()).max(1)));
    }
    Ok(params)
}

/// A function: its name, and its decoded body (None for a prototype).
fn parse_function(c: &mut Cursor, syms: &ModuleSyms, entry: bool) -> Result<(String, Option<Function>), Error> {
    let line = c.line();
    // A `.func` may name its return values first: `.func (.param .b32 func_retval0) name(...)`.
    let ret_list = if !entry && c.eat_punct('(') { parse_params(c)? } else { Vec::new() };
    let name = c.ident()?;
    let param_list = if c.eat_punct('(') { parse_params(c)? } else { Vec::new() };
    let mut f = FnCtx {
        syms,
        regs: std::cell::RefCell::new(Regs { scopes: vec![RegScope::default()], ..Regs::default() }),
        locals: HashMap::new(),
        labels: HashMap::new(),
        fixups: Vec::new(),
        insts: Vec::new(),
        frame: HashMap::new(),
        frame_bytes: 0,
        frame_align: 1,
        entry,
        call_names: Vec::new(),
    };
    // An entry's parameters are the launch's parameter block; a `.func`'s return values and
    // parameters live in its call frame (local memory), where `call` copies them.
    let mut params = Vec::new();
    let mut rets = Vec::new();
    let mut param_bytes = 0u64;
    for (mut p, align) in ret_list {
        p.offset = f.frame_var(p.name.clone(), p.size, align);
        rets.push(p);
    }
    for (mut p, align) in param_list {
        if entry {
            p.offset = align_up(param_bytes, align);
            param_bytes = p.offset + p.size;
            f.locals.insert(p.name.clone(), p.offset);
        } else {
            p.offset = f.frame_var(p.name.clone(), p.size, align);
        }
        params.push(p);
    }
    let mut max_threads = None;
    // Performance directives before the body.
    loop {
        match c.peek() {
            Some(Tok::Punct('{')) => break,
            Some(Tok::Punct(';')) => {
                c.pos += 1;
                return Ok((name, None)); // a prototype
            }
            Some(Tok::Ident(s)) if s == ".maxntid" || s == ".reqntid" => {
                c.pos += 1;
                let mut n = 1u64;
                loop {
                    n *= c.int()? as u64;
                    if !c.eat_punct(',') {
                        break;
                    }
                }
                max_threads = Some(n as u32);
            }
            Some(_) => {
                c.next()?;
            }
            None => return Err(perr(line, "function without a body")),
        }
    }
    c.expect_punct('{')?;
    let mut shared_bytes = syms.shared_bytes;
    let mut depth = 1;
    while depth > 0 {
        let sl = c.line();
        let tok = c.peek().cloned().ok_or_else(|| perr(sl, "unterminated function body"))?;
        match tok {
            Tok::Punct('{') => {
                c.pos += 1;
                depth += 1;
                f.regs.get_mut().scopes.push(RegScope::default());
            }
            Tok::Punct('}') => {
                c.pos += 1;
                depth -= 1;
                f.regs.get_mut().scopes.pop();
            }
            Tok::Punct('@') => parse_inst(c, &mut f)?,
            Tok::Ident(s) if s.starts_with('.') => {
                c.pos += 1;
                match s.as_str() {
                    ".reg" => {
                        let d = parse_decl(c)?;
                        let bits = match d.ty {
                            Ty::Pred => 1,
                            t => t.bits(),
                        };
                        for (n, range, _) in &d.names {
                            match range {
                                Some(k) => f.declare_reg_range(n.clone(), *k, bits),
                                None => f.declare_reg(n.clone(), bits),
                            }
                        }
                    }
                    ".shared" | ".local" | ".param" => {
                        if s == ".shared" && !entry {
                            return Err(unsupported(".shared declared inside a .func", sl));
                        }
                        let d = parse_decl(c)?;
                        for i in 0..d.names.len() {
                            let v = var_from_decl(&d, i, sl)?;
                            if s == ".shared" {
                                let off = align_up(shared_bytes, v.align);
                                shared_bytes = off + v.size;
                                f.locals.insert(v.name, off);
                            } else {
                                // `.local` variables and the `.param` variables of a call
                                // sequence: per call frame.
                                f.frame_var(v.name, v.size, v.align);
                            }
                        }
                    }
                    ".callprototype" => {
                        return Err(unsupported(".callprototype (indirect calls are not simulated)", sl));
                    }
                    ".pragma" | ".loc" | ".maxnreg" => {
                        if s == ".loc" {
                            c.skip_line(sl);
                        } else {
                            c.skip_statement()?;
                        }
                    }
                    _ => return Err(perr(sl, format!("unsupported directive {s} in a function body"))),
                }
            }
            Tok::Ident(s) => {
                if c.peek_at(1) == Some(&Tok::Punct(':')) {
                    c.pos += 2;
                    f.labels.insert(s, f.insts.len());
                } else {
                    parse_inst(c, &mut f)?;
                }
            }
            t => return Err(perr(sl, format!("unexpected {t:?} in a function body"))),
        }
    }
    // Labels, then the dynamic shared base.
    for (i, a, label, l) in std::mem::take(&mut f.fixups) {
        let target = *f.labels.get(&label).ok_or_else(|| perr(l, format!("unknown label {label}")))?;
        f.insts[i].args[a] = Operand::Label(target);
    }
    let dyn_align = syms.dynamic.iter().map(|(_, a)| *a).max().unwrap_or(16).max(16);
    let dynamic_shared_offset = align_up(shared_bytes, dyn_align);
    // A `.func`'s dynamic shared base is the calling entry's: patched when linked.
    if entry {
        for inst in &mut f.insts {
            for a in &mut inst.args {
                patch_dyn(a, dynamic_shared_offset);
            }
        }
    }
    let regs = f.regs.into_inner();
    Ok((
        name.clone(),
        Some(Function {
            name,
            line,
            params,
            param_bytes,
            num_regs: regs.bits.len() as u32,
            reg_bits: regs.bits,
            reg_names: regs.names,
            static_shared: shared_bytes,
            dynamic_shared_offset,
            local_bytes: f.frame_bytes,
            insts: f.insts,
            max_threads,
            rets,
            frame_align: f.frame_align,
            call_names: f.call_names,
            callees: Vec::new(),
        }),
    ))
}

fn patch_dyn(a: &mut Operand, base: u64) {
    match a {
        Operand::Imm(v) if *v >= DYN_MARK && *v < DYN_MARK + WINDOW_SIZE => *v = *v - DYN_MARK + base,
        Operand::Addr(Addr { base: AddrBase::Abs(v), .. }) if *v >= DYN_MARK && *v < DYN_MARK + WINDOW_SIZE => {
            *v = *v - DYN_MARK + base
        }
        Operand::Vec(v) => v.iter_mut().for_each(|x| patch_dyn(x, base)),
        _ => {}
    }
}

fn parse_operand(c: &mut Cursor) -> Result<Raw, Error> {
    let line = c.line();
    if c.eat_punct('{') {
        let mut v = Vec::new();
        while !c.eat_punct('}') {
            if c.eat_punct(',') {
                continue;
            }
            v.push(parse_operand(c)?);
        }
        return Ok(Raw::Vec(v));
    }
    if c.eat_punct('[') {
        let mut base = None;
        let mut off: i128 = 0;
        if let Some(Tok::Ident(s)) = c.peek() {
            base = Some(s.clone());
            c.pos += 1;
        } else {
            off = c.int()?;
        }
        while !c.eat_punct(']') {
            let neg = if c.eat_punct('+') {
                false
            } else if c.eat_punct('-') {
                true
            } else {
                return Err(perr(line, "bad address expression"));
            };
            let v = c.int()?;
            off += if neg { -v } else { v };
        }
        return Ok(Raw::Addr(base, off));
    }
    if c.eat_punct('!') {
        return Ok(Raw::Not(Box::new(parse_operand(c)?)));
    }
    match c.peek() {
        Some(Tok::Ident(s)) => {
            let s = s.clone();
            c.pos += 1;
            if c.is_punct('+') && matches!(c.peek_at(1), Some(Tok::Num(_))) {
                c.pos += 1;
                let off = c.int()?;
                return Ok(Raw::NameOff(s, off));
            }
            Ok(Raw::Name(s))
        }
        Some(Tok::Num(_)) | Some(Tok::Punct('-')) => Ok(Raw::Num(c.number()?)),
        t => Err(perr(line, format!("unexpected {t:?} in an operand"))),
    }
}

fn special(name: &str) -> Option<Special> {
    let dim = |s: &str| match s {
        "x" => Some(0u8),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    if let Some((base, comp)) = name.split_once('.') {
        let d = dim(comp)?;
        return match base {
            "%tid" => Some(Special::Tid(d)),
            "%ntid" => Some(Special::Ntid(d)),
            "%ctaid" => Some(Special::Ctaid(d)),
            "%nctaid" => Some(Special::Nctaid(d)),
            _ => None,
        };
    }
    Some(match name {
        "%laneid" => Special::LaneId,
        "%warpid" => Special::WarpId,
        "%nwarpid" => Special::NWarpId,
        "%lanemask_eq" => Special::LaneMask(0),
        "%lanemask_le" => Special::LaneMask(1),
        "%lanemask_lt" => Special::LaneMask(2),
        "%lanemask_ge" => Special::LaneMask(3),
        "%lanemask_gt" => Special::LaneMask(4),
        "%smid" | "%gridid" => Special::Zero,
        "%clock" | "%clock64" | "%globaltimer" => Special::Clock,
        "%dynamic_smem_size" => Special::DynamicSmem,
        "%total_smem_size" => Special::TotalSmem,
        _ => return None,
    })
}

impl FnCtx<'_> {
    /// A source operand of type `ty`.
    fn src(&self, r: &Raw, ty: Ty, line: u32) -> Result<Operand, Error> {
        Ok(match r {
            Raw::Num(n) => Operand::Imm(imm_bits(*n, ty)),
            Raw::Name(n) if n == "_" => Operand::Sink,
            Raw::Name(n) => {
                if let Some(r) = self.reg(n) {
                    Operand::Reg(r)
                } else if let Some(s) = special(n) {
                    Operand::Special(s)
                } else if let Some(&o) = self.frame.get(n) {
                    Operand::Frame(o)
                } else if let Some(a) = self.symbol(n) {
                    Operand::Imm(a)
                } else if self.syms.funcs.contains(n) {
                    return Err(unsupported(
                        &format!("the address of the function {n} (indirect calls are not simulated)"),
                        line,
                    ));
                } else {
                    return Err(perr(line, format!("unknown name {n}")));
                }
            }
            Raw::NameOff(n, off) => {
                if let Some(&o) = self.frame.get(n) {
                    return Ok(Operand::Frame(o.wrapping_add(*off as u64)));
                }
                let a = self.symbol(n).ok_or_else(|| perr(line, format!("unknown symbol {n}")))?;
                Operand::Imm(a.wrapping_add(*off as u64))
            }
            Raw::Vec(v) => Operand::Vec(v.iter().map(|x| self.src(x, ty, line)).collect::<Result<_, _>>()?),
            Raw::Addr(base, off) => {
                let base = match base {
                    None => AddrBase::Abs(0),
                    Some(n) => match self.reg(n) {
                        Some(r) => AddrBase::Reg(r),
                        None if self.frame.contains_key(n) => AddrBase::Frame(self.frame[n]),
                        None => AddrBase::Abs(
                            self.symbol(n).ok_or_else(|| perr(line, format!("unknown name {n} in an address")))?,
                        ),
                    },
                };
                Operand::Addr(Addr { base, offset: *off as i64 })
            }
            Raw::Not(_) => return Err(perr(line, "a negated operand is only allowed as a predicate")),
        })
    }

    fn dst(&self, r: &Raw, line: u32) -> Result<Operand, Error> {
        match r {
            Raw::Name(n) if n == "_" => Ok(Operand::Sink),
            Raw::Name(n) => self.reg(n).map(Operand::Reg).ok_or_else(|| perr(line, format!("{n} is not a register"))),
            Raw::Vec(v) => Ok(Operand::Vec(v.iter().map(|x| self.dst(x, line)).collect::<Result<_, _>>()?)),
            _ => Err(perr(line, "a destination must be a register")),
        }
    }
}

fn parse_inst(c: &mut Cursor, f: &mut FnCtx<'_>) -> Result<(), Error> {
    let line = c.line();
    let mut guard = None;
    if c.eat_punct('@') {
        let neg = c.eat_punct('!');
        let p = c.ident()?;
        let r = f.reg(&p).ok_or_else(|| perr(line, format!("unknown predicate {p}")))?;
        guard = Some((r, neg));
    }
    let opcode = c.ident()?;
    if opcode == "call" || opcode.starts_with("call.") {
        return parse_call(c, f, guard, line, &opcode);
    }
    let mut raws = Vec::new();
    let mut pdst_raw = None;
    while !c.eat_punct(';') {
        if c.eat_punct(',') {
            continue;
        }
        raws.push(parse_operand(c)?);
        if raws.len() == 1 && c.eat_punct('|') {
            pdst_raw = Some(c.ident()?);
        }
    }
    let pdst = match pdst_raw {
        Some(p) => Some(f.reg(&p).ok_or_else(|| perr(line, format!("unknown predicate {p}")))?),
        None => None,
    };
    let inst = decode(f, &opcode, &raws, line)?;
    let (op, args, vec) = inst;
    let idx = f.insts.len();
    if let Op::Bra = op {
        if let Some(Raw::Name(l)) = raws.first() {
            f.fixups.push((idx, 0, l.clone(), line));
        }
    }
    f.insts.push(Inst { line, guard, op, args, vec, pdst });
    Ok(())
}

/// The names of a `( a, b, ... )` list (the '(' already read) as call-frame operands.
fn call_operands(c: &mut Cursor, f: &FnCtx<'_>, line: u32) -> Result<Vec<Operand>, Error> {
    let mut out = Vec::new();
    while !c.eat_punct(')') {
        if c.eat_punct(',') {
            continue;
        }
        let l = c.line();
        let name = match c.next()? {
            Tok::Ident(n) => n,
            t => {
                return Err(unsupported(
                    &format!("call with the operand {t:?} (only .param variables are supported)"),
                    l,
                ))
            }
        };
        match f.frame.get(&name) {
            Some(&o) => out.push(Operand::Frame(o)),
            None if f.reg(&name).is_some() => {
                return Err(unsupported(
                    &format!("call with the register operand {name} (only .param variables)"),
                    line,
                ))
            }
            None => return Err(perr(line, format!("unknown call operand {name}"))),
        }
    }
    Ok(out)
}

/// `call{.uni} {(rets),} func{, (args)}{, prototype};`
fn parse_call(
    c: &mut Cursor,
    f: &mut FnCtx<'_>,
    guard: Option<(u32, bool)>,
    line: u32,
    opcode: &str,
) -> Result<(), Error> {
    let rets = if c.eat_punct('(') {
        let r = call_operands(c, f, line)?;
        c.expect_punct(',')?;
        r
    } else {
        Vec::new()
    };
    let target = c.ident()?;
    if f.reg(&target).is_some() {
        return Err(unsupported(
            &format!("{opcode} through the register {target} (indirect calls are not simulated)"),
            line,
        ));
    }
    let mut args = Vec::new();
    if c.eat_punct(',') {
        if c.eat_punct('(') {
            args = call_operands(c, f, line)?;
        }
        if c.eat_punct(',') || !c.is_punct(';') {
            return Err(unsupported(
                &format!("{opcode} with a prototype or target list (indirect calls are not simulated)"),
                line,
            ));
        }
    }
    c.expect_punct(';')?;
    if rets.len() > usize::from(u8::MAX) {
        return Err(perr(line, "too many return values"));
    }
    let callee = match f.call_names.iter().position(|n| *n == target) {
        Some(i) => i,
        None => {
            f.call_names.push(target);
            f.call_names.len() - 1
        }
    } as u32;
    let nret = rets.len() as u8;
    let mut operands = rets;
    operands.extend(args);
    f.insts.push(Inst { line, guard, op: Op::Call { callee, nret }, args: operands, vec: 1, pdst: None });
    Ok(())
}

fn unsupported(opcode: &str, line: u32) -> Error {
    Error::Unsupported { instruction: opcode.to_string(), line: line as usize }
}

fn rnd_of(m: &str) -> Option<Rnd> {
    Some(match m {
        "rn" => Rnd::Rn,
        "rz" => Rnd::Rz,
        "rm" => Rnd::Rm,
        "rp" => Rnd::Rp,
        "rni" => Rnd::Rni,
        "rzi" => Rnd::Rzi,
        "rmi" => Rnd::Rmi,
        "rpi" => Rnd::Rpi,
        _ => return None,
    })
}

fn space_of(m: &str) -> Option<Space> {
    Some(match m {
        "global" => Space::Global,
        "shared" | "shared::cta" => Space::Shared,
        "local" => Space::Local,
        "param" | "param::entry" => Space::Param,
        "const" => Space::Const,
        _ => return None,
    })
}

fn cmp_of(m: &str) -> Option<Cmp> {
    Some(match m {
        "eq" => Cmp::Eq,
        "ne" => Cmp::Ne,
        "lt" => Cmp::Lt,
        "le" => Cmp::Le,
        "gt" => Cmp::Gt,
        "ge" => Cmp::Ge,
        "lo" => Cmp::Lo,
        "ls" => Cmp::Ls,
        "hi" => Cmp::Hi,
        "hs" => Cmp::Hs,
        "equ" => Cmp::Equ,
        "neu" => Cmp::Neu,
        "ltu" => Cmp::Ltu,
        "leu" => Cmp::Leu,
        "gtu" => Cmp::Gtu,
        "geu" => Cmp::Geu,
        "num" => Cmp::Num,
        "nan" => Cmp::Nan,
        _ => return None,
    })
}

fn bool_of(m: &str) -> Option<BoolOp> {
    Some(match m {
        "and" => BoolOp::And,
        "or" => BoolOp::Or,
        "xor" => BoolOp::Xor,
        _ => return None,
    })
}

fn double_width(t: Ty) -> Ty {
    match t {
        Ty::U(n) => Ty::U(n * 2),
        Ty::S(n) => Ty::S(n * 2),
        Ty::B(n) => Ty::B(n * 2),
        t => t,
    }
}

type Decoded = (Op, Vec<Operand>, u8);

fn decode(f: &FnCtx<'_>, opcode: &str, raws: &[Raw], line: u32) -> Result<Decoded, Error> {
    let parts: Vec<&str> = opcode.split('.').collect();
    let name = parts[0];
    let mods = &parts[1..];
    let types: Vec<Ty> = mods.iter().filter_map(|m| Ty::parse(m)).collect();
    let has = |m: &str| mods.contains(&m);
    let un = || unsupported(opcode, line);
    let ty0 = types.first().copied();
    let need = |n: usize| -> Result<(), Error> {
        if raws.len() < n {
            Err(perr(line, format!("{opcode} needs {n} operands, found {}", raws.len())))
        } else {
            Ok(())
        }
    };
    // Modifiers that change results in ways this simulator does not model: refused rather than
    // computed as something else.
    if mods.iter().any(|m| matches!(*m, "relu" | "cc" | "NaN" | "xorsign" | "oob" | "satfinite" | "abs")) {
        return Err(un());
    }
    let fmods = FMods { rnd: mods.iter().find_map(|m| rnd_of(m)), ftz: has("ftz"), sat: has("sat") };
    // Destination then sources of one type.
    let dst_srcs = |n: usize, ty: Ty| -> Result<Vec<Operand>, Error> {
        need(n + 1)?;
        let mut v = vec![f.dst(&raws[0], line)?];
        for r in &raws[1..=n] {
            v.push(f.src(r, ty, line)?);
        }
        Ok(v)
    };
    let u32t = Ty::U(32);
    let pred = Ty::Pred;
    let src_pred = |r: &Raw| -> Result<Operand, Error> {
        match r {
            // `!%p` as a source: encoded as a vector of one element (negation marker).
            Raw::Not(inner) => Ok(Operand::Vec(vec![f.src(inner, pred, line)?])),
            r => f.src(r, pred, line),
        }
    };
    let op_ty = ty0.ok_or_else(un);
    let r: Decoded = match name {
        "mov" => {
            let ty = op_ty?;
            (Op::Mov(ty), dst_srcs(1, ty)?, 1)
        }
        "ld" | "st" | "ldu" => {
            let space = mods.iter().find_map(|m| space_of(m)).unwrap_or(Space::Generic);
            let vec = mods.iter().find_map(|m| m.strip_prefix('v').and_then(|n| n.parse::<u8>().ok())).unwrap_or(1);
            let ty = op_ty?;
            need(2)?;
            // `.param` variables of a call sequence and a `.func`'s parameters and return
            // values live in the call frame: local memory.
            let mut space = space;
            if space == Space::Param {
                let a = if name == "st" { &raws[0] } else { &raws[1] };
                if let Operand::Addr(Addr { base, .. }) = f.src(a, u32t, line)? {
                    if matches!(base, AddrBase::Frame(_)) || (!f.entry && matches!(base, AddrBase::Reg(_))) {
                        space = Space::Local;
                    }
                }
            }
            if name == "st" {
                let addr = f.src(&raws[0], u32t, line)?;
                let val = f.src(&raws[1], ty, line)?;
                (Op::St { space, ty }, vec![addr, val], vec)
            } else {
                need(2)?;
                (Op::Ld { space, ty }, vec![f.dst(&raws[0], line)?, f.src(&raws[1], u32t, line)?], vec)
            }
        }
        "cvta" => {
            let space = mods.iter().find_map(|m| space_of(m)).ok_or_else(un)?;
            (Op::Cvta { to: has("to"), space }, dst_srcs(1, Ty::U(64))?, 1)
        }
        "add" | "sub" | "mul" | "div" | "rem" | "min" | "max" | "and" | "or" | "xor" | "shl" | "shr" => {
            let ty = op_ty?;
            if has("cc") || has("relu") || has("NaN") || has("xorsign") {
                return Err(un());
            }
            let mut op = match name {
                "add" => BinOp::Add,
                "sub" => BinOp::Sub,
                "mul" => BinOp::Mul,
                "div" => BinOp::Div,
                "rem" => BinOp::Rem,
                "min" => BinOp::Min,
                "max" => BinOp::Max,
                "and" => BinOp::And,
                "or" => BinOp::Or,
                "xor" => BinOp::Xor,
                "shl" => BinOp::Shl,
                _ => BinOp::Shr,
            };
            if ty.is_float() {
                if matches!(ty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
                    if !matches!(op, BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Min | BinOp::Max)
                        || fmods.rnd.is_some_and(|r| r != Rnd::Rn)
                    {
                        return Err(un());
                    }
                    return Ok((Op::HalfArith(op, ty, fmods, false), dst_srcs(2, ty)?, 1));
                }
                (Op::FloatBin(op, ty, fmods), dst_srcs(2, ty)?, 1)
            } else {
                if name == "mul" {
                    if has("hi") {
                        op = BinOp::MulHi;
                    } else if has("wide") {
                        op = BinOp::MulWide;
                    }
                }
                let bty = if matches!(op, BinOp::Shl | BinOp::Shr) { u32t } else { ty };
                need(3)?;
                let args = if ty == Ty::Pred {
                    vec![f.dst(&raws[0], line)?, src_pred(&raws[1])?, src_pred(&raws[2])?]
                } else {
                    vec![f.dst(&raws[0], line)?, f.src(&raws[1], ty, line)?, f.src(&raws[2], bty, line)?]
                };
                (Op::IntBin(op, ty, has("sat")), args, 1)
            }
        }
        "mad" | "fma" => {
            let ty = op_ty?;
            if ty.is_float() {
                if matches!(ty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
                    if fmods.rnd.is_some_and(|r| r != Rnd::Rn) {
                        return Err(un());
                    }
                    return Ok((Op::HalfArith(BinOp::Mul, ty, fmods, true), dst_srcs(3, ty)?, 1));
                }
                (Op::Fma(ty, fmods), dst_srcs(3, ty)?, 1)
            } else {
                let op = if has("hi") {
                    BinOp::MulHi
                } else if has("wide") {
                    BinOp::MulWide
                } else {
                    BinOp::Mul
                };
                need(4)?;
                let cty = if op == BinOp::MulWide { double_width(ty) } else { ty };
                let args = vec![
                    f.dst(&raws[0], line)?,
                    f.src(&raws[1], ty, line)?,
                    f.src(&raws[2], ty, line)?,
                    f.src(&raws[3], cty, line)?,
                ];
                (Op::IntMad(op, ty), args, 1)
            }
        }
        "neg" | "abs" | "not" | "cnot" | "popc" | "clz" | "brev" | "bfind" => {
            let ty = op_ty?;
            let op = match name {
                "neg" => UnOp::Neg,
                "abs" => UnOp::Abs,
                "not" => UnOp::Not,
                "cnot" => UnOp::Cnot,
                "popc" => UnOp::Popc,
                "clz" => UnOp::Clz,
                "brev" => UnOp::Brev,
                _ => UnOp::Bfind(has("shiftamt")),
            };
            if ty.is_float() {
                if !matches!(op, UnOp::Neg | UnOp::Abs) {
                    return Err(un());
                }
                if !matches!(ty, Ty::F32 | Ty::F64) {
                    return Ok((Op::HalfUn(op, ty), dst_srcs(1, ty)?, 1));
                }
                (Op::FloatUn(op, ty, fmods), dst_srcs(1, ty)?, 1)
            } else if ty == Ty::Pred {
                need(2)?;
                (Op::IntUn(op, ty), vec![f.dst(&raws[0], line)?, src_pred(&raws[1])?], 1)
            } else {
                (Op::IntUn(op, ty), dst_srcs(1, ty)?, 1)
            }
        }
        "ex2" | "lg2" | "rcp" | "rsqrt" | "sqrt" | "sin" | "cos" | "tanh" => {
            let ty = op_ty?;
            if !matches!(ty, Ty::F32 | Ty::F64) {
                return Err(un());
            }
            let func = match name {
                "ex2" => FFunc::Ex2,
                "lg2" => FFunc::Lg2,
                "rcp" => FFunc::Rcp,
                "rsqrt" => FFunc::Rsqrt,
                "sqrt" => FFunc::Sqrt,
                "sin" => FFunc::Sin,
                "cos" => FFunc::Cos,
                _ => FFunc::Tanh,
            };
            (Op::FFunc(func, ty, fmods), dst_srcs(1, ty)?, 1)
        }
        "setp" | "set" => {
            let cmp = mods.iter().find_map(|m| cmp_of(m)).ok_or_else(un)?;
            let bop = mods.iter().find_map(|m| bool_of(m));
            let (dty, sty) = if name == "set" {
                (types.first().copied().ok_or_else(un)?, types.get(1).copied().ok_or_else(un)?)
            } else {
                (pred, op_ty?)
            };
            if matches!(sty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
                return Err(un());
            }
            need(3)?;
            let mut args = vec![f.dst(&raws[0], line)?, f.src(&raws[1], sty, line)?, f.src(&raws[2], sty, line)?];
            if let Some(r) = raws.get(3) {
                args.push(src_pred(r)?);
            } else if bop.is_some() {
                return Err(perr(line, format!("{opcode} needs a predicate operand")));
            }
            if name == "set" {
                (Op::Set(cmp, bop, dty, sty, fmods.ftz), args, 1)
            } else {
                (Op::Setp(cmp, bop, sty, fmods.ftz), args, 1)
            }
        }
        "selp" => {
            let ty = op_ty?;
            need(4)?;
            let args = vec![
                f.dst(&raws[0], line)?,
                f.src(&raws[1], ty, line)?,
                f.src(&raws[2], ty, line)?,
                src_pred(&raws[3])?,
            ];
            (Op::Selp(ty), args, 1)
        }
        "cvt" => {
            if types.len() != 2 || has("relu") {
                return Err(un());
            }
            let (dst, src) = (types[0], types[1]);
            if matches!(src, Ty::F16x2 | Ty::Bf16x2) {
                return Err(un());
            }
            let n = if matches!(dst, Ty::F16x2 | Ty::Bf16x2) { 2 } else { 1 };
            if n == 2 && src != Ty::F32 {
                return Err(un());
            }
            (Op::Cvt { dst, src, mods: fmods }, dst_srcs(n, src)?, 1)
        }
        "bfe" => {
            let ty = op_ty?;
            need(4)?;
            let args = vec![
                f.dst(&raws[0], line)?,
                f.src(&raws[1], ty, line)?,
                f.src(&raws[2], u32t, line)?,
                f.src(&raws[3], u32t, line)?,
            ];
            (Op::Bfe(ty), args, 1)
        }
        "bfi" => {
            let ty = op_ty?;
            need(5)?;
            let args = vec![
                f.dst(&raws[0], line)?,
                f.src(&raws[1], ty, line)?,
                f.src(&raws[2], ty, line)?,
                f.src(&raws[3], u32t, line)?,
                f.src(&raws[4], u32t, line)?,
            ];
            (Op::Bfi(ty), args, 1)
        }
        "prmt" => {
            if mods.len() != 1 {
                return Err(un());
            }
            (Op::Prmt, dst_srcs(3, u32t)?, 1)
        }
        "lop3" => (Op::Lop3, dst_srcs(4, u32t)?, 1),
        "shf" => {
            let left = has("l");
            (Op::Shf(left, has("clamp")), dst_srcs(3, u32t)?, 1)
        }
        "bra" => {
            need(1)?;
            (Op::Bra, vec![Operand::Label(usize::MAX)], 1)
        }
        "ret" => (Op::Ret, vec![], 1),
        "exit" => (Op::Exit, vec![], 1),
        "trap" => (Op::Trap, vec![], 1),
        "bar" | "barrier" => {
            if has("warp") {
                need(1)?;
                (Op::WarpSync, vec![f.src(&raws[0], u32t, line)?], 1)
            } else if has("cluster") {
                return Err(un());
            } else if has("red") {
                let kind = if has("popc") {
                    BarRedOp::Popc
                } else if has("and") {
                    BarRedOp::And
                } else if has("or") {
                    BarRedOp::Or
                } else {
                    return Err(un());
                };
                if raws.len() < 3 {
                    return Err(perr(line, format!("{opcode} needs 3 or 4 operands")));
                }
                let mut args = vec![f.dst(&raws[0], line)?];
                for r in &raws[1..raws.len() - 1] {
                    args.push(f.src(r, u32t, line)?);
                }
                args.push(src_pred(&raws[raws.len() - 1])?);
                (Op::BarRed(kind), args, 1)
            } else {
                let wait = !has("arrive");
                let mut args = Vec::new();
                for r in raws {
                    args.push(f.src(r, u32t, line)?);
                }
                if args.is_empty() {
                    args.push(Operand::Imm(0));
                }
                (Op::Bar { wait }, args, 1)
            }
        }
        "shfl" => {
            if !has("sync") {
                return Err(un());
            }
            let mode = if has("up") {
                ShflMode::Up
            } else if has("down") {
                ShflMode::Down
            } else if has("bfly") {
                ShflMode::Bfly
            } else if has("idx") {
                ShflMode::Idx
            } else {
                return Err(un());
            };
            need(5)?;
            let args = vec![
                f.dst(&raws[0], line)?,
                f.src(&raws[1], Ty::B(32), line)?,
                f.src(&raws[2], u32t, line)?,
                f.src(&raws[3], u32t, line)?,
                f.src(&raws[4], u32t, line)?,
            ];
            (Op::Shfl(mode), args, 1)
        }
        "vote" => {
            if !has("sync") {
                return Err(un());
            }
            let mode = if has("all") {
                VoteMode::All
            } else if has("any") {
                VoteMode::Any
            } else if has("uni") {
                VoteMode::Uni
            } else if has("ballot") {
                VoteMode::Ballot
            } else {
                return Err(un());
            };
            need(3)?;
            let args = vec![f.dst(&raws[0], line)?, src_pred(&raws[1])?, f.src(&raws[2], u32t, line)?];
            (Op::Vote(mode), args, 1)
        }
        "atom" | "red" => {
            let space = mods.iter().find_map(|m| space_of(m)).unwrap_or(Space::Generic);
            let op = if has("add") {
                AtomOp::Add
            } else if has("min") {
                AtomOp::Min
            } else if has("max") {
                AtomOp::Max
            } else if has("and") {
                AtomOp::And
            } else if has("or") {
                AtomOp::Or
            } else if has("xor") {
                AtomOp::Xor
            } else if has("exch") {
                AtomOp::Exch
            } else if has("cas") {
                AtomOp::Cas
            } else if has("inc") {
                AtomOp::Inc
            } else if has("dec") {
                AtomOp::Dec
            } else {
                return Err(un());
            };
            let ty = op_ty?;
            if matches!(ty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) || mods.iter().any(|m| m.starts_with('v')) {
                return Err(un());
            }
            let has_dst = name == "atom";
            let mut args = Vec::new();
            let mut rest = raws;
            if has_dst {
                need(1)?;
                args.push(f.dst(&raws[0], line)?);
                rest = &raws[1..];
            }
            if rest.len() < 2 {
                return Err(perr(line, format!("{opcode}: missing operands")));
            }
            args.push(f.src(&rest[0], u32t, line)?);
            for r in &rest[1..] {
                args.push(f.src(r, ty, line)?);
            }
            (Op::Atom { space, op, ty, has_dst }, args, 1)
        }
        "membar" | "fence" | "nanosleep" | "pmevent" | "prefetch" | "prefetchu" | "griddepcontrol" => {
            (Op::Nop, vec![], 1)
        }
        "mma" => {
            let shape = mods.iter().find(|m| m.starts_with('m')).copied().unwrap_or("");
            let k = match shape {
                "m16n8k16" => 16,
                "m16n8k8" => 8,
                _ => return Err(un()),
            };
            let ok_types = types.len() == 4
                && types[0] == Ty::F32
                && types[3] == Ty::F32
                && types[1] == types[2]
                && matches!(types[1], Ty::F16 | Ty::Bf16);
            if !has("sync") || !has("aligned") || !has("row") || !has("col") || !ok_types || has("satfinite") {
                return Err(un());
            }
            need(4)?;
            let mut args = vec![f.dst(&raws[0], line)?];
            for (r, ty) in raws[1..4].iter().zip([Ty::B(32), Ty::B(32), Ty::F32]) {
                args.push(f.src(r, ty, line)?);
            }
            (Op::Mma { k, bf16: types[1] == Ty::Bf16 }, args, 1)
        }
        "ldmatrix" => {
            let num = if has("x1") {
                1
            } else if has("x2") {
                2
            } else if has("x4") {
                4
            } else {
                return Err(un());
            };
            if !has("sync") || !has("aligned") || !has("m8n8") || ty0 != Some(Ty::B(16)) {
                return Err(un());
            }
            let space = mods.iter().find_map(|m| space_of(m)).unwrap_or(Space::Generic);
            need(2)?;
            (
                Op::Ldmatrix { num, trans: has("trans"), space },
                vec![f.dst(&raws[0], line)?, f.src(&raws[1], u32t, line)?],
                1,
            )
        }
        "cp" if mods.first() == Some(&"async") => {
            if has("commit_group") {
                (Op::CpAsyncCommit, vec![], 1)
            } else if has("wait_group") {
                need(1)?;
                let Raw::Num(Num::Int(n @ 0..=255)) = raws[0] else {
                    return Err(perr(line, format!("{opcode}: N must be an immediate in 0..=255")));
                };
                (Op::CpAsyncWait { n: n as u8, all: false }, vec![], 1)
            } else if has("wait_all") {
                (Op::CpAsyncWait { n: 0, all: true }, vec![], 1)
            } else if has("bulk") || has("mbarrier") || !has("shared") || !has("global") {
                return Err(un());
            } else {
                need(3)?;
                if !matches!(raws[2], Raw::Num(Num::Int(4 | 8 | 16))) {
                    return Err(perr(line, format!("{opcode}: cp-size must be the immediate 4, 8 or 16")));
                }
                let mut args =
                    vec![f.src(&raws[0], u32t, line)?, f.src(&raws[1], u32t, line)?, f.src(&raws[2], u32t, line)?];
                // The fourth operand is either `src-size` (an integer) or `ignore-src` (a
                // predicate: zeros are copied when it is true); a cache policy may follow.
                let ignore_src = match raws.get(3) {
                    Some(Raw::Not(_)) => true,
                    Some(Raw::Name(n)) => f.is_pred(n),
                    _ => false,
                };
                if let Some(r) = raws.get(3) {
                    args.push(if ignore_src { src_pred(r)? } else { f.src(r, u32t, line)? });
                }
                (Op::CpAsync { ignore_src }, args, 1)
            }
        }
        "redux" => {
            let ty = op_ty?;
            let op = if has("add") {
                AtomOp::Add
            } else if has("min") {
                AtomOp::Min
            } else if has("max") {
                AtomOp::Max
            } else if has("and") {
                AtomOp::And
            } else if has("or") {
                AtomOp::Or
            } else if has("xor") {
                AtomOp::Xor
            } else {
                return Err(un());
            };
            if !has("sync") || ty.is_float() {
                return Err(un());
            }
            need(3)?;
            (
                Op::Redux(op, ty),
                vec![f.dst(&raws[0], line)?, f.src(&raws[1], ty, line)?, f.src(&raws[2], u32t, line)?],
                1,
            )
        }
        "match" => {
            let ty = op_ty?;
            if !has("sync") || !(has("any") || has("all")) {
                return Err(un());
            }
            need(3)?;
            (
                Op::Match(has("all"), ty),
                vec![f.dst(&raws[0], line)?, f.src(&raws[1], ty, line)?, f.src(&raws[2], u32t, line)?],
                1,
            )
        }
        "activemask" => (Op::ActiveMask, vec![f.dst(raws.first().ok_or_else(un)?, line)?], 1),
        _ => return Err(un()),
    };
    Ok(r)
}
